package config

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/certs/certstest"
)

// TestTLSErrors: Load names the variables of a half-set pair,
// of files that do not load, and of upstream TLS files with a ws://
// upstream.
func TestTLSErrors(t *testing.T) {
	t.Parallel()
	pki := certstest.New(t)
	certFile, keyFile := pki.WritePair(t, "a", 1)
	_, otherKey := pki.WritePair(t, "b", 2)
	missing := filepath.Join(pki.Dir, "missing.pem")
	garbage := filepath.Join(pki.Dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not PEM\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const wss = "wss://backend/socket"

	for _, tc := range []struct {
		name string
		kv   []string
		want []string // lines
	}{
		{"cert without key", []string{"SLUICE_TLS_CERT_FILE", certFile}, []string{
			`SLUICE_TLS_CERT_FILE="` + certFile + `": set SLUICE_TLS_KEY_FILE too; they go together`}},
		{"key without cert", []string{"SLUICE_TLS_KEY_FILE", keyFile}, []string{
			`SLUICE_TLS_KEY_FILE="` + keyFile + `": set SLUICE_TLS_CERT_FILE too; they go together`}},
		{"unreadable cert", []string{"SLUICE_TLS_CERT_FILE", missing, "SLUICE_TLS_KEY_FILE", keyFile}, []string{
			`SLUICE_TLS_CERT_FILE+SLUICE_TLS_KEY_FILE="` + missing + "+" + keyFile + `": cannot load: open ` + missing + ": no such file or directory"}},
		{"mismatched key", []string{"SLUICE_TLS_CERT_FILE", certFile, "SLUICE_TLS_KEY_FILE", otherKey}, []string{
			`SLUICE_TLS_CERT_FILE+SLUICE_TLS_KEY_FILE="` + certFile + "+" + otherKey + `": cannot load: tls: private key does not match public key`}},
		{"CA with ws upstream", []string{"SLUICE_UPSTREAM_CA_FILE", pki.CAFile}, []string{
			`SLUICE_UPSTREAM_CA_FILE="` + pki.CAFile + `": applies only to a wss:// upstream, not SLUICE_UPSTREAM_URL (` + testUpstream + `)`}},
		{"client pair with ws upstream", []string{"SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile, "SLUICE_UPSTREAM_CLIENT_KEY_FILE", keyFile}, []string{
			`SLUICE_UPSTREAM_CLIENT_CERT_FILE="` + certFile + `": applies only to a wss:// upstream, not SLUICE_UPSTREAM_URL (` + testUpstream + `)`,
			`SLUICE_UPSTREAM_CLIENT_KEY_FILE="` + keyFile + `": applies only to a wss:// upstream, not SLUICE_UPSTREAM_URL (` + testUpstream + `)`}},
		{"CA not PEM", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CA_FILE", garbage}, []string{
			`SLUICE_UPSTREAM_CA_FILE="` + garbage + `": cannot load: no PEM certificate found`}},
		{"CA missing", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CA_FILE", missing}, []string{
			`SLUICE_UPSTREAM_CA_FILE="` + missing + `": cannot load: open ` + missing + ": no such file or directory"}},
		{"client cert without key", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile}, []string{
			`SLUICE_UPSTREAM_CLIENT_CERT_FILE="` + certFile + `": set SLUICE_UPSTREAM_CLIENT_KEY_FILE too; they go together`}},
		{"client key garbage", []string{"SLUICE_UPSTREAM_URL", wss, "SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile, "SLUICE_UPSTREAM_CLIENT_KEY_FILE", garbage}, []string{
			`SLUICE_UPSTREAM_CLIENT_CERT_FILE+SLUICE_UPSTREAM_CLIENT_KEY_FILE="` + certFile + "+" + garbage + `": cannot load: tls: failed to find any PEM data in key input`}},
	} {
		_, err := Load(environ(tc.kv...))
		if got := problemLines(t, err); strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("%s:\n%s\nwant:\n%s", tc.name, err, strings.Join(tc.want, "\n"))
		}
	}

	// Everything set and loadable.
	cfg, err := Load(environ("SLUICE_UPSTREAM_URL", wss,
		"SLUICE_TLS_CERT_FILE", certFile, "SLUICE_TLS_KEY_FILE", keyFile,
		"SLUICE_UPSTREAM_CA_FILE", pki.CAFile,
		"SLUICE_UPSTREAM_CLIENT_CERT_FILE", certFile, "SLUICE_UPSTREAM_CLIENT_KEY_FILE", keyFile))
	if err != nil {
		t.Fatal(err)
	}
	tc, err := upstreamTLSConfig(cfg)
	if err != nil || tc == nil || tc.RootCAs == nil || len(tc.Certificates) != 1 || tc.MinVersion != tls.VersionTLS12 {
		t.Errorf("upstreamTLSConfig = %+v, %v; want the CA pool and one client certificate", tc, err)
	}
}
