package serve

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/rs/zerolog"

	"sluice/config"
	"sluice/internal/wstest"
)

// scrape reads http://adminAddr/metrics as Prometheus does, parsed by
// Prometheus's own text parser.
func scrape(t *testing.T, adminAddr string) map[string]*dto.MetricFamily {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// labels renders a series' labels as {a="1",b="2"}, for messages and keys.
func labels(m *dto.Metric) string {
	s := "{"
	for i, l := range m.GetLabel() {
		if i > 0 {
			s += ","
		}
		s += fmt.Sprintf("%s=%q", l.GetName(), l.GetValue())
	}
	return s + "}"
}

// startEchoSession starts an echo backend and sluice (logging to log) in
// front of it, and runs one session through it to its end, so that the
// series a session creates (close codes) exist. It returns sluice's admin
// address.
func startEchoSession(t *testing.T, env map[string]string, log zerolog.Logger) string {
	t.Helper()
	backend := httptest.NewServer(echoHandler())
	t.Cleanup(backend.Close)
	env[config.Prefix+"UPSTREAM_URL"] = "ws://" + backend.Listener.Addr().String() + "/"
	wsAddr, adminAddr, srv, stop := startSluiceLogged(t, env, log)
	t.Cleanup(stop)
	if _, err := echo(t, "ws://"+wsAddr+"/echo", nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.Sessions() > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the session did not end within 5 s of its close")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return adminAddr
}

// TestBuildInfo: sluice_build_info names the build at 1, and the start-up
// log line carries the same version and commit.
func TestBuildInfo(t *testing.T) {
	var logs wstest.LogBuffer
	_, adminAddr, _, stop := startSluiceLogged(t, map[string]string{config.Prefix + "UPSTREAM_URL": "ws://127.0.0.1:1/"}, zerolog.New(&logs))
	defer stop()
	fam := scrape(t, adminAddr)["sluice_build_info"]
	if fam == nil || fam.GetType() != dto.MetricType_GAUGE || len(fam.GetMetric()) != 1 {
		t.Fatalf("sluice_build_info = %v; want one gauge series", fam)
	}
	m := fam.GetMetric()[0]
	got := map[string]string{}
	for _, l := range m.GetLabel() {
		got[l.GetName()] = l.GetValue()
	}
	if m.GetGauge().GetValue() != 1 || got["version"] == "" || got["commit"] == "" || got["goversion"] != runtime.Version() || len(got) != 3 {
		t.Errorf("sluice_build_info%s %v; want 1 with version, commit and goversion=%s", labels(m), m.GetGauge().GetValue(), runtime.Version())
	}
	want := fmt.Sprintf(`"version":%q,"commit":%q`, got["version"], got["commit"])
	if logs.Count(`"message":"listening"`, want) != 1 {
		t.Errorf("no listening line with %s in:\n%s", want, logs.String())
	}
}
