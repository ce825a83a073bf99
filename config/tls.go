package config

import (
	"crypto/tls"
	"fmt"

	"github.com/sluice-proxy/sluice/certs"
)

// upstreamTLSConfig is the TLS configuration for a wss:// upstream, or nil
// for the defaults (system roots, no client certificate) and for ws://.
// With SLUICE_UPSTREAM_CA_FILE, only its CAs are trusted. Errors name the
// variable.
func upstreamTLSConfig(cfg Config) (*tls.Config, error) {
	if cfg.UpstreamURL == nil || cfg.UpstreamURL.Scheme != "wss" ||
		(cfg.UpstreamCAFile == "" && cfg.UpstreamClientCertFile == "") {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.UpstreamCAFile != "" {
		pool, err := certs.LoadCAPool(cfg.UpstreamCAFile)
		if err != nil {
			return nil, fmt.Errorf("%sUPSTREAM_CA_FILE=%q: %w", Prefix, cfg.UpstreamCAFile, err)
		}
		tc.RootCAs = pool
	}
	if cfg.UpstreamClientCertFile != "" {
		c, err := certs.LoadKeyPair(cfg.UpstreamClientCertFile, cfg.UpstreamClientKeyFile)
		if err != nil {
			return nil, fmt.Errorf("%sUPSTREAM_CLIENT_CERT_FILE=%q, %sUPSTREAM_CLIENT_KEY_FILE=%q: %w",
				Prefix, cfg.UpstreamClientCertFile, Prefix, cfg.UpstreamClientKeyFile, err)
		}
		tc.Certificates = []tls.Certificate{c}
	}
	return tc, nil
}

// checkTLS is check's part for the TLS variables: pairs set together, the
// upstream ones only with wss://, and every file loading. It reads the
// files, so that Load reports a bad one with every other problem.
func (cfg Config) checkTLS(c *checker) {
	if c.pair("TLSCertFile", cfg.TLSCertFile, "TLSKeyFile", cfg.TLSKeyFile) && cfg.TLSCertFile != "" {
		if _, err := certs.LoadKeyPair(cfg.TLSCertFile, cfg.TLSKeyFile); err != nil {
			c.fileProblem(err, "TLSCertFile", cfg.TLSCertFile, "TLSKeyFile", cfg.TLSKeyFile)
		}
	}

	clientPair := c.pair("UpstreamClientCertFile", cfg.UpstreamClientCertFile, "UpstreamClientKeyFile", cfg.UpstreamClientKeyFile)
	upstream := []struct{ name, value string }{
		{"UpstreamCAFile", cfg.UpstreamCAFile},
		{"UpstreamClientCertFile", cfg.UpstreamClientCertFile},
		{"UpstreamClientKeyFile", cfg.UpstreamClientKeyFile},
	}
	if u := cfg.UpstreamURL; u != nil && u.Scheme != "wss" {
		for _, f := range upstream {
			if f.value != "" {
				c.cross(false, f.name, f.value, "UpstreamURL", u, "applies only to a wss:// upstream, not %s")
				c.bad[f.name] = true
			}
		}
	}
	if cfg.UpstreamCAFile != "" && !c.anyBad("UpstreamCAFile") {
		if _, err := certs.LoadCAPool(cfg.UpstreamCAFile); err != nil {
			c.fileProblem(err, "UpstreamCAFile", cfg.UpstreamCAFile)
		}
	}
	if clientPair && cfg.UpstreamClientCertFile != "" && !c.anyBad("UpstreamClientCertFile", "UpstreamClientKeyFile") {
		if _, err := certs.LoadKeyPair(cfg.UpstreamClientCertFile, cfg.UpstreamClientKeyFile); err != nil {
			c.fileProblem(err, "UpstreamClientCertFile", cfg.UpstreamClientCertFile, "UpstreamClientKeyFile", cfg.UpstreamClientKeyFile)
		}
	}
}

// pair reports a and b as bad when only one of them is set, and returns
// whether they are fine: both set or both empty.
func (c *checker) pair(a, aValue, b, bValue string) bool {
	if c.anyBad(a, b) {
		return false
	}
	if (aValue == "") == (bValue == "") {
		return true
	}
	set, missing, value := a, b, aValue
	if aValue == "" {
		set, missing, value = b, a, bValue
	}
	f := fieldsByName[set]
	c.add(Problem{Var: f.key, Value: value, Msg: "set " + fieldsByName[missing].key + " too; they go together", order: f.index})
	c.bad[a], c.bad[b] = true, true
	return false
}

// fileProblem reports that the files of the fields named in nameValues
// (name, value, name, value...) do not load, quoting err.
func (c *checker) fileProblem(err error, nameValues ...string) {
	var keys, values string
	for i := 0; i+1 < len(nameValues); i += 2 {
		if i > 0 {
			keys, values = keys+"+", values+"+"
		}
		keys += fieldsByName[nameValues[i]].key
		values += nameValues[i+1]
		c.bad[nameValues[i]] = true
	}
	c.add(Problem{Var: keys, Value: values, Msg: "cannot load: " + err.Error(), order: fieldsByName[nameValues[0]].index})
}
