package integration

// Upgrade pacing toward the backend (SLUICE_UPSTREAM_MAX_HANDSHAKES,
// SLUICE_UPSTREAM_HANDSHAKES_PER_SECOND, SLUICE_QUEUE_TIMEOUT), end to
// end: a gorilla backend whose upgrades are slow, or held until the test
// lets each go, records what it sees, as a backend restarting under a
// reconnect storm would.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/admin"
	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// slowUpgrader is a gorilla backend whose upgrades take delay, or, with a
// gate, wait for one value on it each. It records the upgrades in
// progress at once and the order they arrived in (the request's id).
type slowUpgrader struct {
	delay time.Duration
	gate  chan struct{} // nil: no gate

	srv  *http.Server
	url  string
	wg   sync.WaitGroup
	done chan struct{}

	mu          sync.Mutex
	inFlight    int
	maxInFlight int
	order       []string    // ids, by arrival; guarded by mu
	starts      []time.Time // arrival times; guarded by mu
	conns       []*gorilla.Conn
	arrived     chan struct{} // one value per arrival
}

func newSlowUpgrader(t *testing.T, delay time.Duration, gated bool) *slowUpgrader {
	t.Helper()
	b := &slowUpgrader{delay: delay, done: make(chan struct{}), arrived: make(chan struct{}, 1024)}
	if gated {
		b.gate = make(chan struct{})
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.srv = &http.Server{Handler: b}
	b.url = "ws://" + ln.Addr().String()
	go b.srv.Serve(ln)
	t.Cleanup(func() {
		close(b.done)
		b.srv.Close()
		b.mu.Lock()
		for _, c := range b.conns {
			c.Close()
		}
		b.mu.Unlock()
		b.wg.Wait()
	})
	return b
}

func (b *slowUpgrader) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.wg.Add(1)
	defer b.wg.Done()
	b.mu.Lock()
	b.inFlight++
	b.maxInFlight = max(b.maxInFlight, b.inFlight)
	b.order = append(b.order, r.URL.Query().Get("id"))
	b.starts = append(b.starts, time.Now())
	b.mu.Unlock()
	b.arrived <- struct{}{}
	if b.gate != nil {
		select {
		case <-b.gate:
		case <-b.done:
		}
	} else {
		time.Sleep(b.delay) // the backend's own slowness, the scenario itself
	}
	// Counted out before the 101 is written: sluice ends the upgrade's
	// turn only once it has read the 101.
	b.mu.Lock()
	b.inFlight--
	b.mu.Unlock()
	up := gorilla.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	c, err := up.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	b.mu.Lock()
	b.conns = append(b.conns, c)
	b.mu.Unlock()
	for {
		if _, _, err := c.ReadMessage(); err != nil {
			c.Close()
			return
		}
	}
}

func (b *slowUpgrader) seen() (maxInFlight int, order []string, starts []time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.maxInFlight, slices.Clone(b.order), slices.Clone(b.starts)
}

// waitArrivals waits for n more upgrades to reach the backend.
func (b *slowUpgrader) waitArrivals(t *testing.T, n int) {
	t.Helper()
	for range n {
		recv(t, b.arrived, "an upgrade at the backend")
	}
}

// upgradeResult is what a raw client's upgrade got.
type upgradeResult struct {
	id     string
	status int
	retry  string // Retry-After
	body   string
	err    error
	at     time.Time
}

// rawUpgrade sends an upgrade for id through sluice at addr, naming
// client (X-Forwarded-For, believed from the trusted 127.0.0.1) when not
// empty, and reads the answer. A 101's socket is closed at once; the
// session then ends. Safe in any goroutine.
func rawUpgrade(addr, id, client string) upgradeResult {
	res := upgradeResult{id: id}
	conn, err := net.DialTimeout("tcp", addr, wstest.IOTimeout)
	if err != nil {
		res.err = err
		return res
	}
	defer conn.Close()
	var b bytes.Buffer
	fmt.Fprintf(&b, "GET /?id=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n", id, addr)
	if client != "" {
		fmt.Fprintf(&b, "X-Forwarded-For: %s\r\n", client)
	}
	fmt.Fprintf(&b, "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", wstest.NewKey())
	conn.SetDeadline(time.Now().Add(3 * wstest.IOTimeout))
	if _, err := conn.Write(b.Bytes()); err != nil {
		res.err = err
		return res
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	res.at = time.Now()
	if err != nil {
		res.err = err
		return res
	}
	res.status, res.retry = resp.StatusCode, resp.Header.Get("Retry-After")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		res.body = string(body)
	}
	return res
}

// upgradeAll runs n upgrades at once, ids 0 to n-1, and returns their
// results by id.
func upgradeAll(addr string, n int) []upgradeResult {
	out := make([]upgradeResult, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { out[i] = rawUpgrade(addr, strconv.Itoa(i), "") })
	}
	wg.Wait()
	return out
}

func pacingEnv(kv ...string) map[string]string {
	env := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		env[config.Prefix+kv[i]] = kv[i+1]
	}
	return env
}

// waitQueued waits until n upgrades wait for their turn in s.
func waitQueued(t *testing.T, s *sluiceUnderTest, n int) {
	t.Helper()
	waitFor(t, wstest.IOTimeout, fmt.Sprintf("%d upgrades queued", n), func() bool {
		_, q := s.srv.UpstreamHandshakes()
		return q == n
	})
}

// operatorView reads s's /status.json and /metrics through the admin
// handler, as from loopback.
func operatorView(t *testing.T, s *sluiceUnderTest, upstream string) (admin.Status, string) {
	t.Helper()
	up, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	page := admin.NewStatusPage(ctx, s.srv, s.reg, "evict")
	defer page.Wait()
	defer cancel()
	h := admin.Handler(s.srv, s.reg, up, page, false, "")
	get := func(path string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodGet, path, nil)
		r.RemoteAddr = "127.0.0.1:1"
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusOK {
			t.Fatalf("GET %s: %d", path, w.Code)
		}
		return w
	}
	var st admin.Status
	if err := json.Unmarshal(get("/status.json").Body.Bytes(), &st); err != nil {
		t.Fatal(err)
	}
	return st, get("/metrics").Body.String()
}

// TestPacingBoundsUpgradesInFlight: forty clients at once toward a
// backend whose upgrades take 20 ms, with SLUICE_UPSTREAM_MAX_HANDSHAKES=4:
// every client gets its 101 (none is refused), and the backend never has
// more than 4 upgrades in progress.
func TestPacingBoundsUpgradesInFlight(t *testing.T) {
	b := newSlowUpgrader(t, 20*time.Millisecond, false)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "4"), nil)
	for _, r := range upgradeAll(s.addr, 40) {
		if r.err != nil || r.status != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade %s: %d %q %v, want 101", r.id, r.status, r.body, r.err)
		}
	}
	peak, _, _ := b.seen()
	if peak > 4 || peak < 2 {
		t.Fatalf("the backend saw %d upgrades in progress at once, want at most 4 (and some overlap)", peak)
	}
	waitFor(t, wstest.IOTimeout, "sessions to end", func() bool { return s.srv.Sessions() == 0 })
	if inFlight, queued := s.srv.UpstreamHandshakes(); inFlight != 0 || queued != 0 {
		t.Errorf("after the storm: %d upgrades in flight and %d queued, want 0 and 0", inFlight, queued)
	}
}

// TestPacingRateIsSmooth: twenty clients at once at
// SLUICE_UPSTREAM_HANDSHAKES_PER_SECOND=50 reach a backend whose upgrades
// take 20 ms one every 20 ms, not in a burst: at most 2 in progress at
// once, and the last starts no sooner than 19 intervals after the first.
func TestPacingRateIsSmooth(t *testing.T) {
	b := newSlowUpgrader(t, 20*time.Millisecond, false)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "0", "UPSTREAM_HANDSHAKES_PER_SECOND", "50"), nil)
	for _, r := range upgradeAll(s.addr, 20) {
		if r.err != nil || r.status != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade %s: %d %q %v, want 101", r.id, r.status, r.body, r.err)
		}
	}
	peak, _, starts := b.seen()
	if peak > 2 {
		t.Errorf("the backend saw %d upgrades in progress at once, want at most 2 at 50/s and 20 ms each", peak)
	}
	slices.SortFunc(starts, func(a, b time.Time) int { return a.Compare(b) })
	// 1 ms of slack per gap for the loopback's scheduling.
	if span, want := starts[len(starts)-1].Sub(starts[0]), 19*19*time.Millisecond; span < want {
		t.Errorf("20 upgrades reached the backend within %v, want at least %v (one per 20 ms)", span, want)
	}
}

// TestPacingFIFOWithinAnAddress: with one upgrade in flight and the
// backend holding it, the next ones from one client address reach the
// backend in the order they arrived.
func TestPacingFIFOWithinAnAddress(t *testing.T) {
	b := newSlowUpgrader(t, 0, true)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "1"), nil)
	results := make(chan upgradeResult, 8)
	go func() { results <- rawUpgrade(s.addr, "first", "") }()
	b.waitArrivals(t, 1)
	for i := range 6 {
		go func() { results <- rawUpgrade(s.addr, strconv.Itoa(i), "") }()
		waitQueued(t, s, i+1) // each behind the one before
	}
	// What an operator sees meanwhile: the status page and the metrics.
	st, metrics := operatorView(t, s, b.url)
	if st.Totals.UpgradesQueued != 6 || st.Totals.UpgradesInFlight != 1 {
		t.Errorf("status totals: %d upgrades queued, %d in flight; want 6 and 1", st.Totals.UpgradesQueued, st.Totals.UpgradesInFlight)
	}
	for _, line := range []string{"sluice_upstream_handshake_queue_length 6", "sluice_upstream_handshakes_in_flight 1", "sluice_upstream_handshake_wait_seconds_count 1"} {
		if !strings.Contains(metrics, "\n"+line+"\n") {
			t.Errorf("/metrics lacks %q", line)
		}
	}
	for range 7 {
		b.gate <- struct{}{}
	}
	for range 7 {
		if r := recv(t, results, "an upgrade's answer"); r.status != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade %s: %d %q %v, want 101", r.id, r.status, r.body, r.err)
		}
	}
	if _, order, _ := b.seen(); !slices.Equal(order, []string{"first", "0", "1", "2", "3", "4", "5"}) {
		t.Fatalf("the backend saw upgrades in the order %v, want first, then 0 to 5", order)
	}
}

// TestPacingFairAcrossAddresses: one client address with twenty upgrades
// queued does not starve another that queues after them: round-robin
// over addresses lets the second one through next.
func TestPacingFairAcrossAddresses(t *testing.T) {
	b := newSlowUpgrader(t, 0, true)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "1", "TRUSTED_PROXIES", "127.0.0.1"), nil)
	results := make(chan upgradeResult, 32)
	go func() { results <- rawUpgrade(s.addr, "first", "192.0.2.1") }()
	b.waitArrivals(t, 1)
	for i := range 20 {
		go func() { results <- rawUpgrade(s.addr, "flood"+strconv.Itoa(i), "192.0.2.1") }()
	}
	waitQueued(t, s, 20)
	go func() { results <- rawUpgrade(s.addr, "other", "198.51.100.7") }()
	waitQueued(t, s, 21)
	for range 22 {
		b.gate <- struct{}{}
	}
	for range 22 {
		if r := recv(t, results, "an upgrade's answer"); r.status != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade %s: %d %q %v, want 101", r.id, r.status, r.body, r.err)
		}
	}
	_, order, _ := b.seen()
	if i := slices.Index(order, "other"); i < 0 || i > 2 {
		t.Fatalf("the other address's upgrade reached the backend %dth, behind the flood: %v; want it within the first 3", i+1, order)
	}
}

// TestPacingQueueTimeout: an upgrade that waits past SLUICE_QUEUE_TIMEOUT
// gets 503 with a Retry-After, and is counted; the backend never sees it.
func TestPacingQueueTimeout(t *testing.T) {
	b := newSlowUpgrader(t, 0, true)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "1", "QUEUE_TIMEOUT", "200ms"), nil)
	held := make(chan upgradeResult, 1)
	go func() { held <- rawUpgrade(s.addr, "held", "") }()
	b.waitArrivals(t, 1)
	began := time.Now()
	r := rawUpgrade(s.addr, "late", "")
	waited := r.at.Sub(began)
	if r.err != nil || r.status != http.StatusServiceUnavailable || r.retry == "" {
		t.Fatalf("upgrade past the queue timeout: %d (Retry-After %q) %q %v, want 503 with Retry-After", r.status, r.retry, r.body, r.err)
	}
	if waited < 200*time.Millisecond {
		t.Errorf("refused after %v, before the queue timeout of 200ms", waited)
	}
	if got := metricValue(t, s, "sluice_connections_rejected_total", "reason", "upstream_queue_timeout"); got != 1 {
		t.Errorf("rejected{reason=upstream_queue_timeout} = %v, want 1", got)
	}
	b.gate <- struct{}{}
	if r := recv(t, held, "the held upgrade's answer"); r.status != http.StatusSwitchingProtocols {
		t.Fatalf("held upgrade: %d %v, want 101", r.status, r.err)
	}
	if _, order, _ := b.seen(); !slices.Equal(order, []string{"held"}) {
		t.Errorf("the backend saw %v, want only the held upgrade", order)
	}
}

// TestPacingDrainRefusesQueued: when sluice starts shutting down, the
// upgrades waiting for their turn get 503 at once, while the one in
// flight still completes.
func TestPacingDrainRefusesQueued(t *testing.T) {
	b := newSlowUpgrader(t, 0, true)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "1"), nil)
	held := make(chan upgradeResult, 1)
	go func() { held <- rawUpgrade(s.addr, "held", "") }()
	b.waitArrivals(t, 1)
	queued := make(chan upgradeResult, 3)
	for i := range 3 {
		go func() { queued <- rawUpgrade(s.addr, strconv.Itoa(i), "") }()
	}
	waitQueued(t, s, 3)
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), wstest.ShutdownTimeout)
		defer cancel()
		shut <- s.shutdown(ctx)
	}()
	// The backend still holds the first upgrade: the answers come from
	// the drain, not from a turn.
	for range 3 {
		r := recv(t, queued, "a queued upgrade's answer")
		if r.err != nil || r.status != http.StatusServiceUnavailable || r.retry == "" {
			t.Fatalf("queued upgrade %s at shutdown: %d (Retry-After %q) %q %v, want 503 with Retry-After", r.id, r.status, r.retry, r.body, r.err)
		}
	}
	b.gate <- struct{}{}
	if r := recv(t, held, "the held upgrade's answer"); r.status != http.StatusSwitchingProtocols {
		t.Fatalf("held upgrade: %d %v, want 101", r.status, r.err)
	}
	if err := recv(t, shut, "Shutdown"); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, order, _ := b.seen(); !slices.Equal(order, []string{"held"}) {
		t.Errorf("the backend saw %v, want only the held upgrade", order)
	}
}

// TestPacingQueueFull: with the queue at its bound, the next upgrade is
// refused at once with 503 and a Retry-After, not queued.
func TestPacingQueueFull(t *testing.T) {
	b := newSlowUpgrader(t, 0, true)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "1"), func(o *proxy.Options) { o.UpstreamHandshakeQueue = 2 })
	results := make(chan upgradeResult, 3)
	go func() { results <- rawUpgrade(s.addr, "held", "") }()
	b.waitArrivals(t, 1)
	for i := range 2 {
		go func() { results <- rawUpgrade(s.addr, strconv.Itoa(i), "") }()
	}
	waitQueued(t, s, 2)
	began := time.Now()
	r := rawUpgrade(s.addr, "over", "")
	if r.err != nil || r.status != http.StatusServiceUnavailable || r.retry == "" {
		t.Fatalf("upgrade over the queue's bound: %d (Retry-After %q) %q %v, want 503 with Retry-After", r.status, r.retry, r.body, r.err)
	}
	if waited := r.at.Sub(began); waited > 2*time.Second {
		t.Errorf("refused after %v, want at once (the queue timeout is 10s)", waited)
	}
	if got := metricValue(t, s, "sluice_connections_rejected_total", "reason", "upstream_queue_full"); got != 1 {
		t.Errorf("rejected{reason=upstream_queue_full} = %v, want 1", got)
	}
	for range 3 {
		b.gate <- struct{}{}
	}
	for range 3 {
		if r := recv(t, results, "an upgrade's answer"); r.status != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade %s: %d %q %v, want 101", r.id, r.status, r.body, r.err)
		}
	}
}

// TestPacingSkipsClientsThatLeft: an upgrade whose client gives up while
// it waits for its turn (a storm's clients retry) is not dialled: its
// turn goes to the next, and the backend never sees it.
func TestPacingSkipsClientsThatLeft(t *testing.T) {
	b := newSlowUpgrader(t, 0, true)
	s := startSluiceEnv(t, b.url, pacingEnv("UPSTREAM_MAX_HANDSHAKES", "1"), nil)
	held := make(chan upgradeResult, 1)
	go func() { held <- rawUpgrade(s.addr, "held", "") }()
	b.waitArrivals(t, 1)
	gone, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(gone, "GET /?id=gone HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n", wstest.NewKey())
	waitQueued(t, s, 1)
	gone.Close() // gives up
	next := make(chan upgradeResult, 1)
	go func() { next <- rawUpgrade(s.addr, "next", "") }()
	waitQueued(t, s, 2)
	b.gate <- struct{}{} // held is answered; its turn passes on
	if r := recv(t, held, "the held upgrade's answer"); r.status != http.StatusSwitchingProtocols {
		t.Fatalf("held upgrade: %d %v, want 101", r.status, r.err)
	}
	b.waitArrivals(t, 1)
	b.gate <- struct{}{}
	if r := recv(t, next, "the next upgrade's answer"); r.status != http.StatusSwitchingProtocols {
		t.Fatalf("next upgrade: %d %v, want 101", r.status, r.err)
	}
	if _, order, _ := b.seen(); !slices.Equal(order, []string{"held", "next"}) {
		t.Errorf("the backend saw %v, want held then next: the client that left is not dialled", order)
	}
	if got := metricValue(t, s, "sluice_connections_rejected_total", "reason", "client_gone"); got != 1 {
		t.Errorf("rejected{reason=client_gone} = %v, want 1", got)
	}
}
