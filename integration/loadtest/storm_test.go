//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestParseFlagsStorm(t *testing.T) {
	c, err := parseFlags([]string{"-mode", "storm"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.clients != 2000 || c.upgradeDelay != 20*time.Millisecond {
		t.Errorf("storm defaults: %d clients, %v per upgrade; want 2000 and 20ms", c.clients, c.upgradeDelay)
	}
	if _, err := parseFlags([]string{"-mode", "storm", "-upgrade-delay", "11s"}, io.Discard); err == nil {
		t.Error("-upgrade-delay 11s accepted")
	}
}

// TestStormBackoff: full jitter, within a window that doubles from
// 100 ms and stops at 5 s.
func TestStormBackoff(t *testing.T) {
	for attempt, window := range map[int]time.Duration{0: 100 * time.Millisecond, 3: 800 * time.Millisecond, 6: 5 * time.Second, 40: 5 * time.Second} {
		var longest time.Duration
		for range 2000 {
			d := stormBackoff(attempt)
			if d < 0 || d >= window {
				t.Fatalf("attempt %d: %v, want within [0, %v)", attempt, d, window)
			}
			longest = max(longest, d)
		}
		if longest < window/2 {
			t.Errorf("attempt %d: the longest of 2000 waits was %v, want the window of %v used", attempt, longest, window)
		}
	}
}

// TestUpgradeCounter: the backend's counter sees the upgrades inside
// their hold at once, and reports them on /upgrades.
func TestUpgradeCounter(t *testing.T) {
	release := make(chan struct{})
	var entered, wg sync.WaitGroup
	entered.Add(3)
	passed := 0
	var mu sync.Mutex
	u := &upgradeCounter{
		next: http.HandlerFunc(func(http.ResponseWriter, *http.Request) { mu.Lock(); passed++; mu.Unlock() }),
		hold: func() { entered.Done(); <-release },
	}
	for range 3 {
		wg.Go(func() { u.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil)) })
	}
	entered.Wait()
	close(release)
	wg.Wait()
	rec := httptest.NewRecorder()
	u.serveStats(rec, httptest.NewRequest(http.MethodGet, "/upgrades", nil))
	var s upgradeStats
	if err := json.Unmarshal(rec.Body.Bytes(), &s); err != nil {
		t.Fatal(err)
	}
	if s.Upgrades != 3 || s.PeakInFlight != 3 || s.FirstNs == 0 || s.LastNs < s.FirstNs || passed != 3 {
		t.Errorf("stats %+v, %d passed on: want 3 upgrades, 3 at once, all passed on", s, passed)
	}
}

func TestRefusalKind(t *testing.T) {
	for err, want := range map[error]string{
		errors.New("dial ws://127.0.0.1:1/: websocket: bad handshake (HTTP 503 Service Unavailable)"): "503",
		errors.New("dial ws://127.0.0.1:1/: websocket: bad handshake (HTTP 502 Bad Gateway)"):         "502",
	} {
		if got := refusalKind(err); got != want {
			t.Errorf("refusalKind(%q) = %q, want %q", err, got, want)
		}
	}
}

func TestStormReport(t *testing.T) {
	r := &runner{cfg: config{mode: modeStorm, clients: 500, upgradeDelay: 20 * time.Millisecond, duration: 20 * time.Second, repeat: 1}}
	r.cfg.targets, _ = parseTargets("sluice,sluice:SLUICE_UPSTREAM_MAX_HANDSHAKES=0,cmd:HAPROXY_SERVER_OPTS='maxconn 64' sh integration/loadtest/peers/haproxy.sh")
	res := [][]stormResult{
		{{Target: "sluice", Clients: 500, Connected: 500, Back: 500, AllBack: true, BackAfter: 0.512, Restart: 0.031,
			Upgrades: 500, PeakInFlight: 64, UpgradeRate: 3012.4, Refusals: map[string]int{"502": 37}, TargetCPU: 0.21}},
		{{Target: "sluice:SLUICE_UPSTREAM_MAX_HANDSHAKES=0", Clients: 500, Connected: 500, Back: 500, AllBack: true, BackAfter: 0.4,
			Restart: 0.03, Upgrades: 500, PeakInFlight: 412, UpgradeRate: 4100, TargetCPU: 0.2}},
		{{Target: "cmd:haproxy maxconn", Clients: 500, Connected: 64, Back: 30, Restart: 0.03, Upgrades: 30, PeakInFlight: 30,
			UpgradeRate: 900, Refusals: map[string]int{"503": 400, "eof": 3}, TargetCPU: 0.05}},
	}
	var out bytes.Buffer
	writeStormReport(&out, r, res)
	for _, want := range []string{
		"500 clients connect and idle",
		"taking 20ms per upgrade",
		"| sluice | 500/500 | 500 | 0.51 | 0.03 | 64 | 3012 | 500 | 37 (37×502) | 0.21 |",
		"| sluice:SLUICE_UPSTREAM_MAX_HANDSHAKES=0 | 500/500 | 500 | 0.40 | 0.03 | 412 | 4100 | 500 | 0 | 0.20 |",
		"| cmd:haproxy maxconn | 64/500 | 30 | not within -duration | 0.03 | 30 | 900 | 30 | 403 (400×503 3×eof) | 0.05 |",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}
