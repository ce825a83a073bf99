package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/config"
	"github.com/sluice-proxy/sluice/internal/wstest"
)

// Slow means stalled: clients that read every echo as fast as they can are
// never evicted, under any policy, with every default as shipped, on this
// two-core machine while the rest of the suite runs. Each of 40 gorilla
// clients sends messages of random kind and size (most under 16 KiB, some
// of 100-160 KiB, a few up to 300 KiB) as fast as it can, fragmented, with
// pings between the fragments, to a gorilla echo backend, and checks every
// echo byte for byte and every pong in order. The machine is saturated:
// queues grow deep, messages wait seconds under -race, and bytes keep
// flowing.
func TestBusyClientsNeverEvicted(t *testing.T) {
	for _, policy := range []string{"evict", "drop", "pause"} {
		t.Run(policy, func(t *testing.T) {
			backend := startEchoBackend(t)
			s := startSluiceDefaults(t, backend, map[string]string{config.Prefix + "POLICY": policy})
			results := runBusyClients(t, s.url, busyClients, busyMessages(t), nil)
			for _, r := range results {
				if r.err != nil {
					t.Errorf("client %d: %v", r.id, r.err)
				}
			}
			if ev := s.srv.RecentEvictions(); len(ev) != 0 {
				t.Errorf("%d clients evicted, want none: %+v", len(ev), ev)
			}
			if st := s.srv.Budget().Stats(); st.DroppedTotal != 0 {
				t.Errorf("%d messages dropped, want none", st.DroppedTotal)
			}
		})
	}
}

// One client that stops reading among the busy ones is evicted, and only
// it: the others all finish.
func TestStalledClientAmongBusyEvicted(t *testing.T) {
	backend := startEchoBackend(t)
	s := startSluiceDefaults(t, backend, nil)
	stalled := dialStalledSender(t, s.url)
	results := runBusyClients(t, s.url, busyClients, busyMessages(t), func() {
		waitFor(t, 30*time.Second, "the stalled client's eviction", func() bool { return len(s.srv.RecentEvictions()) > 0 })
	})
	for _, r := range results {
		if r.err != nil {
			t.Errorf("client %d: %v", r.id, r.err)
		}
	}
	// Evicted for its full queue (slow), or, when a busy machine fills it
	// more slowly than the write deadline runs, for its blocked write.
	ev := s.srv.RecentEvictions()
	if len(ev) != 1 || ev[0].Client != stalled || (ev[0].Reason != "slow" && ev[0].Reason != "write_timeout") {
		t.Errorf("evictions %+v; want exactly the stalled client %s, for slow or write_timeout", ev, stalled)
	}
}

const busyClients = 40

// busyMessages is how many messages each busy client sends.
func busyMessages(t *testing.T) int {
	if testing.Short() {
		return 30
	}
	return 100
}

// startEchoBackend serves a gorilla echo backend that streams each message
// back as it reads it, and returns its ws:// URL.
func startEchoBackend(t *testing.T) string { return startEchoBackendAfter(t, 0) }

// startEchoBackendAfter is startEchoBackend with each connection read only
// after deaf has passed: a backend in a long pause.
func startEchoBackendAfter(t *testing.T, deaf time.Duration) string {
	t.Helper()
	up := gorilla.Upgrader{ReadBufferSize: 32 << 10, WriteBufferSize: 32 << 10}
	var wg sync.WaitGroup
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		wg.Add(1)
		defer wg.Done()
		defer c.Close()
		// gorilla's own ping handler gives up on a pong it cannot write
		// within a second, and drops it: while sluice holds this
		// connection back (pause), that would lose pongs here, not in
		// sluice.
		c.SetPingHandler(func(data string) error {
			err := c.WriteControl(gorilla.PongMessage, []byte(data), time.Now().Add(time.Minute))
			if errors.Is(err, gorilla.ErrCloseSent) {
				return nil
			}
			return err
		})
		time.Sleep(deaf)
		for {
			kind, rd, err := c.NextReader()
			if err != nil {
				return
			}
			wr, err := c.NextWriter(kind)
			if err != nil {
				return
			}
			if _, err := io.Copy(wr, rd); err != nil {
				return
			}
			if err := wr.Close(); err != nil {
				return
			}
		}
	}))
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
		wg.Wait()
	})
	return "ws" + srv.URL[len("http"):]
}

type busyResult struct {
	id  int
	err error
}

// busySpec is one message a busy client sends.
type busySpec struct {
	kind int
	size int
}

func busySpecs(id, n int) []busySpec {
	rng := rand.New(rand.NewPCG(uint64(id), 22))
	specs := make([]busySpec, n)
	for i := range specs {
		kind := gorilla.BinaryMessage
		if rng.IntN(2) == 0 {
			kind = gorilla.TextMessage
		}
		var size int
		switch p := rng.IntN(100); {
		case p < 80:
			size = 8 + rng.IntN(16<<10)
		case p < 95:
			size = 100<<10 + rng.IntN(60<<10)
		default:
			size = 160<<10 + rng.IntN(140<<10)
		}
		specs[i] = busySpec{kind, size}
	}
	return specs
}

// busyPayload fills p with message seq of client id: the sequence number,
// then letters (valid UTF-8 for text messages) that depend on both.
func busyPayload(p []byte, id, seq int) {
	binary.BigEndian.PutUint32(p, uint32(id))
	binary.BigEndian.PutUint32(p[4:], uint32(seq))
	for i := 8; i < len(p); i++ {
		p[i] = 'a' + byte((i*7+seq*13+id)%26)
	}
}

// runBusyClients runs n busy clients of msgs messages each against url
// and returns once all have finished; during, if not nil, runs meanwhile.
func runBusyClients(t *testing.T, url string, n, msgs int, during func()) []busyResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	results := make([]busyResult, n)
	var wg sync.WaitGroup
	for id := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[id] = busyResult{id: id, err: busyClient(ctx, url, id, busySpecs(id, msgs))}
		}()
	}
	if during != nil {
		during()
	}
	wg.Wait()
	return results
}

// busyClient sends specs as fast as it can and checks every echo and pong.
func busyClient(ctx context.Context, url string, id int, specs []busySpec) error {
	d := gorilla.Dialer{ReadBufferSize: 32 << 10, WriteBufferSize: 4 << 10, HandshakeTimeout: wstest.IOTimeout}
	c, _, err := d.DialContext(ctx, url, nil)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.NetConn().Close() })
	defer stop()

	// gorilla's own ping handler gives up on a pong it cannot write within
	// a second and breaks the connection for good (its write error is
	// sticky): a client held back by TCP backpressure for longer, as
	// sluice (or any proxy, or the backend) may hold it while its echoes
	// wait, would end itself. Answer sluice's keepalive pings as patiently
	// as the data.
	c.SetPingHandler(func(data string) error {
		err := c.WriteControl(gorilla.PongMessage, []byte(data), time.Now().Add(time.Minute))
		if errors.Is(err, gorilla.ErrCloseSent) {
			return nil
		}
		return err
	})
	var pongs atomic.Int64 // the last ping counter answered
	var pongErr atomic.Value
	c.SetPongHandler(func(data string) error {
		n, err := strconv.ParseInt(data, 10, 64)
		if err != nil || n != pongs.Load()+1 {
			pongErr.CompareAndSwap(nil, fmt.Errorf("pong %q after pong %d", data, pongs.Load()))
		}
		pongs.Store(n)
		return nil
	})

	sendErr := make(chan error, 1)
	var pings int64
	go func() {
		rng := rand.New(rand.NewPCG(uint64(id), 7))
		buf := make([]byte, 300<<10)
		for seq, sp := range specs {
			p := buf[:sp.size]
			busyPayload(p, id, seq)
			w, err := c.NextWriter(sp.kind)
			if err != nil {
				sendErr <- err
				return
			}
			for len(p) > 0 {
				chunk := min(len(p), 1+rng.IntN(32<<10))
				if _, err := w.Write(p[:chunk]); err != nil {
					sendErr <- err
					return
				}
				p = p[chunk:]
				if rng.IntN(4) == 0 {
					pings++
					// sluice may hold this client back while its echoes
					// wait (pause, evict at the mark): the ping waits too.
					if err := c.WriteControl(gorilla.PingMessage, []byte(strconv.FormatInt(pings, 10)), time.Now().Add(time.Minute)); err != nil {
						sendErr <- err
						return
					}
				}
			}
			if err := w.Close(); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()

	want := make([]byte, 300<<10)
	for seq, sp := range specs {
		kind, got, err := c.ReadMessage()
		if err != nil {
			var ce *gorilla.CloseError
			if errors.As(err, &ce) {
				return fmt.Errorf("echo %d of %d: closed %d %q", seq, len(specs), ce.Code, ce.Text)
			}
			return fmt.Errorf("echo %d of %d: %w", seq, len(specs), err)
		}
		busyPayload(want[:sp.size], id, seq)
		if kind != sp.kind || !bytes.Equal(got, want[:sp.size]) {
			return fmt.Errorf("echo %d: kind %d, %d bytes; want kind %d, %d bytes as sent", seq, kind, len(got), sp.kind, sp.size)
		}
	}
	if err := <-sendErr; err != nil {
		return fmt.Errorf("send: %w", err)
	}
	// The pongs to the last pings may still be on their way: one more
	// round trip, a ping of our own answered after them.
	pings++
	last := pings
	if err := c.WriteControl(gorilla.PingMessage, []byte(strconv.FormatInt(last, 10)), time.Now().Add(time.Minute)); err != nil {
		return fmt.Errorf("last ping: %w", err)
	}
	if err := c.WriteMessage(gorilla.TextMessage, []byte("12345678end")); err != nil {
		return fmt.Errorf("last message: %w", err)
	}
	if _, _, err := c.ReadMessage(); err != nil {
		return fmt.Errorf("last echo: %w", err)
	}
	if err, _ := pongErr.Load().(error); err != nil {
		return err
	}
	if got := pongs.Load(); got != last {
		return fmt.Errorf("%d pongs, want %d", got, last)
	}
	c.WriteControl(gorilla.CloseMessage, gorilla.FormatCloseMessage(gorilla.CloseNormalClosure, ""), time.Now().Add(wstest.IOTimeout))
	return nil
}

// dialStalledSender connects a client that never reads, with a small
// receive window, and sends 256 KiB messages until its socket stops taking
// them (40 of them fill a queue's 10 MiB); it returns the client's address
// as sluice sees it.
func dialStalledSender(t *testing.T, url string) string {
	t.Helper()
	d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout, NetDial: (&net.Dialer{Control: wstest.SmallWindow(8 << 10)}).Dial}
	c, _, err := d.Dial(url, nil)
	if err != nil {
		t.Fatalf("stalled client: dial: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		msg := make([]byte, 256<<10)
		for range 100 {
			c.SetWriteDeadline(time.Now().Add(time.Minute))
			if err := c.WriteMessage(gorilla.BinaryMessage, msg); err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		c.NetConn().Close()
		<-done
	})
	return c.NetConn().LocalAddr().String()
}

// While sluice is not reading a client because its backend is not reading
// (the client's frames wait for room toward it), the client's pongs wait
// behind its data in its own send buffer: its pong deadline must not run
// out for that. With pings every 2 s and 1.5 s to answer (the issue's
// setting), a backend deaf for 6 s, and a client sending 24 MiB at once:
// no pong timeout, and every echo arrives.
func TestPongDeadlineWaitsWhileHeld(t *testing.T) {
	backend := startEchoBackendAfter(t, 6*time.Second)
	s := startSluiceEnv(t, backend, map[string]string{
		config.Prefix + "PING_INTERVAL": "2s",
		config.Prefix + "PONG_TIMEOUT":  "1500ms",
	}, nil)
	specs := make([]busySpec, 384)
	for i := range specs {
		specs[i] = busySpec{gorilla.BinaryMessage, 64 << 10}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if err := busyClient(ctx, s.url, 1, specs); err != nil {
		t.Errorf("client: %v", err)
	}
	if ev := s.srv.RecentEvictions(); len(ev) != 0 {
		t.Errorf("evictions %+v, want none", ev)
	}
}
