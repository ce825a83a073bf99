package serve

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/admin"
	"github.com/sluice-proxy/sluice/config"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"
)

// floodBackend is a gorilla/websocket server that writes 4 KiB messages
// to every connection as fast as it can until quiet is called; then it
// holds the connections open, silent, until the peer or close ends them.
type floodBackend struct {
	ln        net.Listener
	srv       *http.Server
	hush      chan struct{} // closed by quiet
	stop      chan struct{} // closed by close
	hushOnce  sync.Once
	closeOnce sync.Once
	wg        sync.WaitGroup // two per connection
}

func startFloodBackend(t *testing.T) *floodBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &floodBackend{ln: ln, hush: make(chan struct{}), stop: make(chan struct{})}
	up := websocket.Upgrader{}
	b.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		b.wg.Add(2)
		defer b.wg.Done()
		defer c.Close()
		peerGone := make(chan struct{})
		go func() { // answers sluice's close, then lets the writer fail
			defer b.wg.Done()
			defer close(peerGone)
			for {
				if _, _, err := c.NextReader(); err != nil {
					return
				}
			}
		}()
		msg := make([]byte, 4096)
	flood:
		for {
			select {
			case <-b.hush:
				break flood
			case <-b.stop:
				return
			default:
			}
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if err := c.WriteMessage(websocket.BinaryMessage, msg); err != nil {
				return
			}
		}
		select {
		case <-peerGone:
		case <-b.stop:
		}
	})}
	go b.srv.Serve(ln)
	return b
}

// quiet stops the flood but keeps the connections open.
func (b *floodBackend) quiet() { b.hushOnce.Do(func() { close(b.hush) }) }

func (b *floodBackend) close() {
	b.closeOnce.Do(func() {
		close(b.stop)
		b.srv.Close()
		b.wg.Wait()
	})
}

// dialStalled connects a client with a small receive window and an
// Ethernet MSS, as the demo's slow clients do, so that the kernel holds
// little once it stops reading.
func dialStalled(t *testing.T, u string) *websocket.Conn {
	t.Helper()
	nd := &net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
			if serr == nil {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 1460)
			}
		})
		return cmp.Or(err, serr)
	}}
	d := websocket.Dialer{NetDialContext: nd.DialContext, HandshakeTimeout: 5 * time.Second}
	c, _, err := d.Dial(u, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func getStatus(t *testing.T, client *http.Client, url string) admin.Status {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("GET %s: %s, Content-Type %q", url, resp.Status, resp.Header.Get("Content-Type"))
	}
	var s admin.Status
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// pollStatus reads /status.json until done accepts a document or 10 s
// pass, and returns the last document read and whether done accepted it.
func pollStatus(t *testing.T, client *http.Client, url string, done func(admin.Status) bool) (admin.Status, bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := getStatus(t, client, url)
		if done(s) {
			return s, true
		}
		if !time.Now().Before(deadline) {
			return s, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stalledSetup is a real sluice in front of a flooding backend, with a
// client that has read once and stopped reading.
type stalledSetup struct {
	backend   *floodBackend
	adminAddr string
	client    *http.Client // for the admin listener
	conn      *websocket.Conn
	me        string // the stalled client's address, as sluice names it
}

// startStalled starts the backend, sluice with the given policy and extra
// settings, and the stalled client; cleanups stop them all. firstRead
// decides whether the client's one read may end otherwise than with a
// message (an eviction may come first on a busy machine).
func startStalled(t *testing.T, policy string, extra map[string]string, firstRead func(error) bool) stalledSetup {
	t.Helper()
	backend := startFloodBackend(t)
	t.Cleanup(backend.close)
	env := map[string]string{
		config.Prefix + "UPSTREAM_URL":           "ws://" + backend.ln.Addr().String() + "/",
		config.Prefix + "POLICY":                 policy,
		config.Prefix + "GLOBAL_QUEUE_MAX_BYTES": "64MiB",
		config.Prefix + "SHUTDOWN_TIMEOUT":       "3s",
		config.Prefix + "CLOSE_TIMEOUT":          "1s",
		// Slow within half a second of stalling, not the default 5 s.
		config.Prefix + "SLOW_CLIENT_AGE": "500ms",
	}
	maps.Copy(env, extra)
	wsAddr, adminAddr, _, stop := startSluice(t, env)
	t.Cleanup(stop)
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	c := dialStalled(t, "ws://"+wsAddr+"/feed")
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := c.ReadMessage(); err != nil && !firstRead(err) { // then it stops reading
		t.Fatal(err)
	}
	return stalledSetup{
		backend:   backend,
		adminAddr: adminAddr,
		client:    &http.Client{Transport: tr, Timeout: 5 * time.Second},
		conn:      c,
		me:        c.LocalAddr().String(),
	}
}

func noError(error) bool { return false }

// TestStatusShowsSlowClient: a client that stops reading behind a real
// sluice and a flooding backend shows up in /status.json's top list as
// slow, with its own address and a non-empty queue.
func TestStatusShowsSlowClient(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })  // after the setup's cleanups
	st := startStalled(t, "drop", nil, noError) // drop keeps the slow client connected
	adminAddr, client, me := st.adminAddr, st.client, st.me

	// The queue's depth moves (drop trims it, the kernel takes some as its
	// send buffer grows), so wait for one document that shows it all.
	var row admin.Session
	got, ok := pollStatus(t, client, "http://"+adminAddr+"/status.json", func(got admin.Status) bool {
		for _, s := range got.Top {
			if s.Client == me && s.State == admin.StateSlow && s.QueueBytes > 0 && s.QueueMessages > 0 &&
				got.Totals.Slow == 1 && got.Totals.QueuedBytes > 0 {
				row = s
				return true
			}
		}
		return false
	})
	if !ok {
		t.Fatalf("client %s never showed as slow with a queue; last: totals %+v, top %+v", me, got.Totals, got.Top)
	}
	if got.Policy != "drop" || got.Totals.Connections != 1 {
		t.Errorf("totals = %+v, policy %q; want 1 connection, policy drop", got.Totals, got.Policy)
	}
	if got.Totals.Ceiling != 64<<20 || got.Totals.Share <= 0 || got.Totals.Draining {
		t.Errorf("totals = %+v; want the 64 MiB ceiling, a share above 0, not draining", got.Totals)
	}
	if got.Totals.Evictions == nil || *got.Totals.Evictions != 0 {
		t.Errorf("evictions = %v; want a count of 0", got.Totals.Evictions)
	}
	if len(got.History) == 0 || got.Evictions == nil {
		t.Errorf("history has %d samples, evictions %v; want a sample and an empty list", len(got.History), got.Evictions)
	}
	t.Logf("slow row: %+v", row)

	resp, err := client.Get("http://" + adminAddr + "/status")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != http.StatusOK || !strings.HasPrefix(ct, "text/html") {
		t.Errorf("GET /status: %s, Content-Type %q; want 200 text/html", resp.Status, ct)
	}
	for _, id := range []string{"connections", "slow", "paused", "queued-bytes", "dropped", "evictions-total", "top-table", "evictions", "chart"} {
		if !strings.Contains(string(page), fmt.Sprintf("id=%q", id)) {
			t.Errorf("page has no element with id %q", id)
		}
	}
	if strings.Contains(string(page), "src=\"http") || strings.Contains(string(page), "href=\"http") {
		t.Error("page loads an external asset")
	}
}

// TestStatusShowsEviction: under the evict policy the same stalled client
// is closed, and /status.json lists it among the evictions with its reason
// and counts it by reason.
func TestStatusShowsEviction(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) }) // after the setup's cleanups
	// On a busy machine the flood may get the client evicted before it
	// reads anything: then its first read is the 1013.
	st := startStalled(t, "evict", nil, func(err error) bool { return websocket.IsCloseError(err, 1013) })
	adminAddr, client, me := st.adminAddr, st.client, st.me
	got, _ := pollStatus(t, client, "http://"+adminAddr+"/status.json", func(got admin.Status) bool { return len(got.Evictions) > 0 })
	if len(got.Evictions) != 1 {
		t.Fatalf("evictions = %+v; want the stalled client", got.Evictions)
	}
	e := got.Evictions[0]
	if e.Client != me || e.Reason != "slow" || e.QueueMessages == 0 || e.Time.IsZero() {
		t.Errorf("eviction = %+v; want client %s, reason slow, its queue, a time", e, me)
	}
	if got.Totals.Evictions == nil || *got.Totals.Evictions != 1 || got.Totals.EvictionsByReason["slow"] != 1 {
		t.Errorf("totals: evictions %v by reason %v; want 1, slow 1", got.Totals.Evictions, got.Totals.EvictionsByReason)
	}
}
