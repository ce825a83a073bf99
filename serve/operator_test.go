package serve

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/rs/zerolog"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
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

// gauge is the value of the gauge series name{labels}, and whether it
// exists; labels are name, value pairs.
func gauge(fams map[string]*dto.MetricFamily, name string, lv ...string) (float64, bool) {
	for _, m := range fams[name].GetMetric() {
		match := len(m.GetLabel()) == len(lv)/2
		for i, l := range m.GetLabel() {
			match = match && 2*i+1 < len(lv) && l.GetName() == lv[2*i] && l.GetValue() == lv[2*i+1]
		}
		if match {
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// counts are what must never fall in one scrape: each counter's value,
// each histogram's and summary's count and sum, each bucket's cumulative
// count, keyed by series.
func counts(fams map[string]*dto.MetricFamily) map[string]float64 {
	out := map[string]float64{}
	for name, fam := range fams {
		for _, m := range fam.GetMetric() {
			key := name + labels(m)
			switch fam.GetType() {
			case dto.MetricType_COUNTER:
				out[key] = m.GetCounter().GetValue()
			case dto.MetricType_HISTOGRAM:
				h := m.GetHistogram()
				out[key+"_count"] = float64(h.GetSampleCount())
				out[key+"_sum"] = h.GetSampleSum()
				for _, b := range h.GetBucket() {
					out[fmt.Sprintf("%s_bucket{le=%g}", key, b.GetUpperBound())] = float64(b.GetCumulativeCount())
				}
			case dto.MetricType_SUMMARY:
				out[key+"_count"] = float64(m.GetSummary().GetSampleCount())
				out[key+"_sum"] = m.GetSummary().GetSampleSum()
			}
		}
	}
	return out
}

// TestMetricsNeverFall scrapes sluice while a client stalls behind it and
// after it leaves: no counter, histogram or summary series may fall or
// vanish between two scrapes of one process, or rate() and
// histogram_quantile() read a reset. Queue depths are gauges that follow
// the stalled client up and back down.
func TestMetricsNeverFall(t *testing.T) {
	st := startStalled(t, "drop", nil, noError) // drop keeps the slow client connected
	var prev map[string]float64
	step := func(when string) map[string]*dto.MetricFamily {
		t.Helper()
		fams := scrape(t, st.adminAddr)
		cur := counts(fams)
		for k, was := range prev {
			if now, ok := cur[k]; !ok {
				t.Errorf("%s: %s vanished (was %g)", when, k, was)
			} else if now < was {
				t.Errorf("%s: %s fell from %g to %g", when, k, was, now)
			}
		}
		prev = cur
		return fams
	}
	poll := func(when string, done func(map[string]*dto.MetricFamily) bool) map[string]*dto.MetricFamily {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			fams := step(when)
			if done(fams) || t.Failed() {
				return fams
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not reached within 5 s", when)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	fams := poll("while the client stalls", func(fams map[string]*dto.MetricFamily) bool {
		slow, _ := gauge(fams, "sluice_slow_clients")
		return slow == 1
	})
	if deepest, _ := gauge(fams, "sluice_queue_depth_max_messages"); deepest < 1 {
		t.Errorf("sluice_queue_depth_max_messages = %g with a slow client; want at least 1", deepest)
	}
	if n, _ := gauge(fams, "sluice_clients_queue_deeper_than", "messages", "0"); n != 1 {
		t.Errorf(`sluice_clients_queue_deeper_than{messages="0"} = %g with one slow client; want 1`, n)
	}
	step("again")

	st.conn.Close()
	fams = poll("after the client left", func(fams map[string]*dto.MetricFamily) bool {
		active, _ := gauge(fams, "sluice_connections_active")
		return active == 0
	})
	deepest, ok1 := gauge(fams, "sluice_queue_depth_max_messages")
	n, ok2 := gauge(fams, "sluice_clients_queue_deeper_than", "messages", "0")
	if deepest != 0 || n != 0 || !ok1 || !ok2 {
		t.Errorf("after the client left: deepest queue %g (%v), clients deeper than 0 %g (%v); want both 0", deepest, ok1, n, ok2)
	}
}

// dashboardExprs are the PromQL expressions of every panel of the Grafana
// dashboard, rows' collapsed panels included.
func dashboardExprs(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var dash struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var exprs []string
	var walk func([]json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			for _, tg := range p.Targets {
				exprs = append(exprs, tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(dash.Panels)
	return exprs
}

// TestDashboardShowsEveryMetric: every sluice_* metric a real sluice
// exports, once a session has run through it (a vector's series exist only
// once used), appears in a panel's expression of
// deploy/grafana-dashboard.json, histograms as _bucket, _sum or _count.
func TestDashboardShowsEveryMetric(t *testing.T) {
	adminAddr := startEchoSession(t, map[string]string{}, zerolog.Nop())
	fams := scrape(t, adminAddr)
	exprs := strings.Join(dashboardExprs(t, "../deploy/grafana-dashboard.json"), "\n")
	names := 0
	for name := range fams {
		if !strings.HasPrefix(name, "sluice_") {
			continue
		}
		names++
		re := regexp.MustCompile(`(^|[^a-zA-Z0-9_:])` + name + `(_bucket|_sum|_count)?($|[^a-zA-Z0-9_:])`)
		if !re.MatchString(exprs) {
			t.Errorf("%s (%s) is on no panel of deploy/grafana-dashboard.json", name, fams[name].GetType())
		}
	}
	if _, ok := fams["sluice_close_codes_total"]; !ok || names < 30 {
		t.Errorf("scraped %d sluice_* metrics, close codes %v: want the session's series and at least 30", names, ok)
	}
}

// TestPodMonitor: deploy/podmonitor.yaml scrapes the port and pods
// deploy/kubernetes.yaml defines, as the job deploy/alerts.yml expects.
// (A structural check of the text: the module has no YAML parser.)
func TestPodMonitor(t *testing.T) {
	read := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	pm, k8s, alerts := read("../deploy/podmonitor.yaml"), read("../deploy/kubernetes.yaml"), read("../deploy/alerts.yml")
	for _, want := range []string{
		"apiVersion: monitoring.coreos.com/v1\n",
		"kind: PodMonitor\n",
		"  selector:\n    matchLabels:\n      app.kubernetes.io/name: ws-app\n",
		"  podMetricsEndpoints:\n    - port: admin\n      path: /metrics\n",
		"      relabelings:\n        - targetLabel: job\n          replacement: sluice\n",
	} {
		if !strings.Contains(pm, want) {
			t.Errorf("deploy/podmonitor.yaml lacks %q", want)
		}
	}
	for _, want := range []string{
		"  template:\n    metadata:\n      labels:\n        app.kubernetes.io/name: ws-app\n",
		"            - name: admin\n              containerPort: 9090\n",
		"              value: \":9090\"\n",
	} {
		if !strings.Contains(k8s, want) {
			t.Errorf("deploy/kubernetes.yaml lacks %q, which the PodMonitor relies on", want)
		}
	}
	if !strings.Contains(alerts, `job="sluice"`) {
		t.Error(`deploy/alerts.yml no longer expects job="sluice": change the PodMonitor's job label with it`)
	}
}

// TestLogLines runs a session and a drain through sluice with the logger
// the binary uses, and reads every line as a log collector would: each is
// JSON with a timestamp to the millisecond, and every field that holds a
// duration says its unit in its name (seconds).
func TestLogLines(t *testing.T) {
	cfg, err := config.Load(map[string]string{config.Prefix + "UPSTREAM_URL": "ws://127.0.0.1:1/"})
	if err != nil {
		t.Fatal(err)
	}
	var logs wstest.LogBuffer
	env := map[string]string{config.Prefix + "DRAIN_SPREAD": "10ms", config.Prefix + "SHUTDOWN_TIMEOUT": "3s"}
	// Checked last, after the cleanups that drain and stop sluice.
	t.Cleanup(func() {
		stamp := regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)$`)
		durationWord := regexp.MustCompile(`(^|_)(duration|delay|spread|timeout|retry|wait|age|elapsed|interval)(_|$)`)
		seen := map[string]bool{}
		for line := range strings.SplitSeq(strings.TrimSpace(logs.String()), "\n") {
			var fields map[string]any
			if err := json.Unmarshal([]byte(line), &fields); err != nil {
				t.Errorf("log line is not JSON: %v\n%s", err, line)
				continue
			}
			msg, _ := fields["message"].(string)
			seen[msg] = true
			ts, _ := fields["time"].(string)
			if !stamp.MatchString(ts) {
				t.Errorf("%q: time %q; want RFC 3339 with milliseconds", msg, ts)
			} else if when, err := time.Parse(time.RFC3339Nano, ts); err != nil || time.Since(when).Abs() > time.Minute {
				t.Errorf("%q: time %q parses to %v, %v", msg, ts, when, err)
			}
			for k, v := range fields {
				if durationWord.MatchString(k) && !strings.HasSuffix(k, "_seconds") {
					t.Errorf("%q: field %s=%v holds a duration without its unit in its name", msg, k, v)
				}
			}
			if msg == "session closed" {
				if d, ok := fields["duration_seconds"].(float64); !ok || d <= 0 || d > 10 {
					t.Errorf("session closed: duration_seconds = %v; want the session's few seconds at most", fields["duration_seconds"])
				}
			}
			if msg == "draining" && (fields["delay_seconds"] != 0.0 || fields["spread_seconds"] != 0.01 || fields["timeout_seconds"] != 3.0) {
				t.Errorf("draining: %v; want delay_seconds 0, spread_seconds 0.01, timeout_seconds 3", fields)
			}
		}
		for _, want := range []string{"listening", "session closed", "draining", "stopped"} {
			if !seen[want] {
				t.Errorf("no %q line in:\n%s", want, logs.String())
			}
		}
	})
	startEchoSession(t, env, cfg.Logger(&logs))
}
