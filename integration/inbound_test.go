package integration

// Inbound protection end to end: a client over its message or byte rate is
// held back (throttle) or closed with 1008 (close); the cap on all clients
// toward the backend is shared fairly; fragmented messages count once;
// ping floods are bounded; the limit holds across an idle park.

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// arrivals is what a recording echo backend saw: each data message's
// payload and arrival time, and each ping's arrival time, per connection
// in connection order.
type arrivals struct {
	mu    sync.Mutex
	msgs  []arrival // guarded by mu
	pings []time.Time
}

type arrival struct {
	conn    int
	payload string
	at      time.Time
}

func (a *arrivals) snapshot() ([]arrival, []time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]arrival(nil), a.msgs...), append([]time.Time(nil), a.pings...)
}

// serveRecordingEcho runs a raw gobwas echo backend that records every
// message and ping as it arrives, then echoes the message (pings get
// pongs), frame by frame as sent, until the close.
func serveRecordingEcho(t testing.TB) (string, *arrivals) {
	rec := &arrivals{}
	var next int
	var nextMu sync.Mutex
	b := wstest.ServeRaw(t, wstest.RawOptions{}, func(conn *wstest.RawConn) {
		nextMu.Lock()
		id := next
		next++
		nextMu.Unlock()
		var msg []byte
		for {
			conn.SetDeadline(time.Now().Add(4 * wstest.IOTimeout))
			f, err := wstest.ReadFrame(conn.BR)
			if err != nil {
				return
			}
			now := time.Now()
			switch f.Op {
			case ws.OpClose:
				conn.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpClose, Payload: f.Payload}))
				return
			case ws.OpPing:
				rec.mu.Lock()
				rec.pings = append(rec.pings, now)
				rec.mu.Unlock()
				conn.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpPong, Payload: f.Payload}))
				continue
			case ws.OpPong:
				continue
			}
			msg = append(msg, f.Payload...)
			if f.Fin {
				rec.mu.Lock()
				rec.msgs = append(rec.msgs, arrival{conn: id, payload: string(msg), at: now})
				rec.mu.Unlock()
				conn.Write(wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Payload: msg}))
				msg = nil
			}
		}
	})
	return b.Addr, rec
}

// textBurst is n text messages "prefix-i" in one byte string.
func textBurst(prefix string, n int) []byte {
	var wire []byte
	for i := range n {
		wire = append(wire, wstest.Encode(wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: fmt.Appendf(nil, "%s-%d", prefix, i)})...)
	}
	return wire
}

// expectEchoes reads n echoes "prefix-i", in order.
func expectEchoes(t testing.TB, c *wstest.Client, prefix string, from, n int) {
	t.Helper()
	for i := from; i < from+n; i++ {
		c.Conn.SetReadDeadline(time.Now().Add(4 * wstest.IOTimeout))
		f, err := wstest.ReadFrame(c.BR)
		if err != nil {
			t.Fatalf("echo %d: %v", i, err)
		}
		if want := fmt.Sprintf("%s-%d", prefix, i); f.Op != ws.OpText || string(f.Payload) != want {
			t.Fatalf("echo %d = %v, want %q", i, f, want)
		}
	}
}

func writeAll(t testing.TB, c *wstest.Client, wire []byte) {
	t.Helper()
	c.Conn.SetWriteDeadline(time.Now().Add(4 * wstest.IOTimeout))
	if _, err := c.Conn.Write(wire); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// span is the time from the first to the last of times.
func span(times []time.Time) time.Duration {
	if len(times) < 2 {
		return 0
	}
	return times[len(times)-1].Sub(times[0])
}

// minSpan is the least time n frames may take through a bucket of rate a
// second holding burst: the first burst pass at once, the rest one every
// 1/rate. A little under, for the clocks of two processes' views.
func minSpan(n, rate, burst int) time.Duration {
	return time.Duration(float64(n-burst-1) / float64(rate) * 0.95 * float64(time.Second))
}

// A flooding client under throttle: every message reaches the backend and
// comes back, in order, but never faster than its rate after the burst.
func TestInboundThrottle(t *testing.T) {
	// The burst's echoes must fit the client's queue (100 messages by
	// default) while its writer starts: a burst of 50.
	const rate, n = 50, 150
	addr, rec := serveRecordingEcho(t)
	s := startSluiceEnv(t, "ws://"+addr, map[string]string{"SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND": fmt.Sprint(rate)}, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	writeAll(t, c, textBurst("m", n))
	expectEchoes(t, c, "m", 0, n)
	msgs, _ := rec.snapshot()
	if len(msgs) != n {
		t.Fatalf("backend saw %d messages, want %d", len(msgs), n)
	}
	var times []time.Time
	for _, m := range msgs {
		times = append(times, m.at)
	}
	// Past the burst of one second's worth, one message every 1/rate.
	if got, least := span(times[rate:]), minSpan(n-rate+1, rate, 1); got < least {
		t.Errorf("the %d messages after the burst reached the backend in %v, faster than %d/s allows (%v)", n-rate, got, rate, least)
	}
	if d := metricValue(t, s, "sluice_messages_delayed_total", "limit", "client_rate"); d == 0 {
		t.Error("sluice_messages_delayed_total{limit=client_rate} is 0")
	}
	c.Write(t, wstest.Frame{Fin: true, Op: ws.OpClose, Masked: true, Payload: closePayload(1000, "")})
	if code, _ := c.ReadClose(t); code != 1000 {
		t.Fatalf("close %d, want 1000", code)
	}
}

// Under close, a client past its limit gets what the backend already sent,
// then 1008; the backend gets 1001; the eviction is counted as rate_limit.
func TestInboundClose(t *testing.T) {
	const rate, n = 10, 40
	addr, rec := serveRecordingEcho(t)
	s := startSluiceEnv(t, "ws://"+addr, map[string]string{
		"SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND": fmt.Sprint(rate),
		"SLUICE_CLIENT_RATE_POLICY":             "close",
	}, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	writeAll(t, c, textBurst("m", n))
	var echoes int
	for {
		f := c.Read(t)
		if f.Op == ws.OpClose {
			code, _ := ws.ParseCloseFrameData(f.Payload)
			if code != ws.StatusPolicyViolation {
				t.Fatalf("close %d, want 1008", code)
			}
			break
		}
		if want := fmt.Sprintf("m-%d", echoes); string(f.Payload) != want {
			t.Fatalf("echo %d = %v, want %q", echoes, f, want)
		}
		echoes++
	}
	msgs, _ := rec.snapshot()
	// The burst (one second's worth) passed, and every one of them came
	// back before the close: nothing the backend sent was lost.
	if echoes < rate || echoes != len(msgs) {
		t.Errorf("%d echoes before the close, backend saw %d messages; want the burst of %d, all echoed", echoes, len(msgs), rate)
	}
	expectCleanEOF(t, c)
	waitFor(t, wstest.IOTimeout, "the eviction", func() bool { return len(s.srv.RecentEvictions()) == 1 })
	if ev := s.srv.RecentEvictions()[0]; ev.Reason != "rate_limit" {
		t.Errorf("evicted for %q, want rate_limit", ev.Reason)
	}
}

// Under a cap on all clients, a flooder cannot take the quiet clients'
// share: their messages reach the backend before the flooder's backlog
// does, though the flooder started first.
func TestInboundUpstreamCapFair(t *testing.T) {
	const capRate, flood, quietN, quietMsgs = 100, 300, 4, 5
	addr, rec := serveRecordingEcho(t)
	s := startSluiceEnv(t, "ws://"+addr, map[string]string{"SLUICE_UPSTREAM_MAX_MESSAGES_PER_SECOND": fmt.Sprint(capRate)}, nil)
	flooder := wstest.Dial(t, s.addr, "/", nil, nil)
	quiet := make([]*wstest.Client, quietN)
	for i := range quiet {
		quiet[i] = wstest.Dial(t, s.addr, "/", nil, nil)
	}
	writeAll(t, flooder, textBurst("f", flood))
	for round := range quietMsgs {
		for i, q := range quiet {
			q.Write(t, wstest.Frame{Fin: true, Op: ws.OpText, Masked: true, Payload: fmt.Appendf(nil, "q%d-%d", i, round)})
		}
		for _, q := range quiet {
			q.Read(t)
		}
	}
	expectEchoes(t, flooder, "f", 0, flood)
	msgs, _ := rec.snapshot()
	var lastQuiet, lastFlood time.Time
	var quietSeen int
	for _, m := range msgs {
		if m.payload[0] == 'q' {
			lastQuiet = m.at
			quietSeen++
		} else {
			lastFlood = m.at
		}
	}
	if quietSeen != quietN*quietMsgs {
		t.Fatalf("backend saw %d quiet messages, want %d", quietSeen, quietN*quietMsgs)
	}
	if !lastQuiet.Before(lastFlood) {
		t.Errorf("the quiet clients' last message reached the backend %v after the flooder's last: they waited behind its backlog", lastQuiet.Sub(lastFlood))
	}
	var times []time.Time
	for _, m := range msgs {
		times = append(times, m.at)
	}
	burst := max(1, capRate/10)
	if got, least := span(times), minSpan(len(times), capRate, burst); got < least {
		t.Errorf("%d messages reached the backend in %v, faster than the cap of %d/s allows (%v)", len(times), got, capRate, least)
	}
}

// A fragmented message counts once against the message rate; its bytes
// count against the byte rate as its frames arrive.
func TestInboundFragmentsCountOnce(t *testing.T) {
	const rate, frags = 20, 10
	addr, rec := serveRecordingEcho(t)
	s := startSluiceEnv(t, "ws://"+addr, map[string]string{"SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND": fmt.Sprint(rate)}, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	// rate messages of frags frames each: within the burst as messages,
	// ten times past it as frames.
	var wire []byte
	for i := range rate {
		for j := range frags {
			op := ws.OpContinuation
			if j == 0 {
				op = ws.OpText
			}
			wire = append(wire, wstest.Encode(wstest.Frame{Fin: j == frags-1, Op: op, Masked: true, Payload: fmt.Appendf(nil, "%d.%d;", i, j)})...)
		}
	}
	writeAll(t, c, wire)
	for range rate {
		c.Read(t)
	}
	msgs, _ := rec.snapshot()
	if len(msgs) != rate {
		t.Fatalf("backend saw %d messages, want %d", len(msgs), rate)
	}
	if d := metricValue(t, s, "sluice_messages_delayed_total", "limit", "client_rate"); d != 0 {
		t.Errorf("%v frames were held back: a fragmented message must count once", d)
	}

	// The same messages against a byte rate of a tenth of their bytes a
	// second: held back, frame by frame, though no message is refused.
	addr2, _ := serveRecordingEcho(t)
	s2 := startSluiceEnv(t, "ws://"+addr2, map[string]string{"SLUICE_CLIENT_MAX_BYTES_PER_SECOND": fmt.Sprint(len(wire) / 10)}, nil)
	c2 := wstest.Dial(t, s2.addr, "/", nil, nil)
	writeAll(t, c2, wire)
	for range rate {
		c2.Read(t)
	}
	if d := metricValue(t, s2, "sluice_messages_delayed_total", "limit", "client_rate"); d == 0 {
		t.Error("no frame was held back under a byte rate a tenth of what was sent")
	}
}

// A ping flood is bounded by the message rate, and every ping still gets
// its pong.
func TestInboundPingFlood(t *testing.T) {
	const rate, n = 100, 300
	addr, rec := serveRecordingEcho(t)
	s := startSluiceEnv(t, "ws://"+addr, map[string]string{"SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND": fmt.Sprint(rate)}, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	wire, payloads := pingBurst(n, true)
	writeAll(t, c, wire)
	for i, want := range payloads {
		c.Conn.SetReadDeadline(time.Now().Add(4 * wstest.IOTimeout))
		f, err := wstest.ReadFrame(c.BR)
		if err != nil {
			t.Fatalf("pong %d: %v", i, err)
		}
		if f.Op != ws.OpPong || !bytes.Equal(f.Payload, want) {
			t.Fatalf("frame %d = %v, want a pong %q", i, f, want)
		}
	}
	_, pings := rec.snapshot()
	if len(pings) != n {
		t.Fatalf("backend saw %d pings, want %d", len(pings), n)
	}
	if got, least := span(pings[rate:]), minSpan(n-rate+1, rate, 1); got < least {
		t.Errorf("pings after the burst reached the backend in %v, faster than %d/s allows (%v)", got, rate, least)
	}
}

// A throttled client's allowance lives with its session, not its reader:
// after a quiet spell long enough for its reader to park, it has its burst
// again and no more.
func TestInboundThrottleAcrossIdlePark(t *testing.T) {
	const rate, n = 20, 40
	addr, rec := serveRecordingEcho(t)
	s := startSluiceEnv(t, "ws://"+addr, map[string]string{"SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND": fmt.Sprint(rate)}, nil)
	c := wstest.Dial(t, s.addr, "/", nil, nil)
	writeAll(t, c, textBurst("a", n))
	expectEchoes(t, c, "a", 0, n)
	delayed := metricValue(t, s, "sluice_messages_delayed_total", "limit", "client_rate")
	if delayed == 0 {
		t.Fatal("the first burst was not held back")
	}
	// Quiet for longer than a reader waits before it parks (a second).
	time.Sleep(1500 * time.Millisecond)
	writeAll(t, c, textBurst("b", n))
	for i := range n {
		c.Conn.SetReadDeadline(time.Now().Add(4 * wstest.IOTimeout))
		f, err := wstest.ReadFrame(c.BR)
		if err != nil || string(f.Payload) != fmt.Sprintf("b-%d", i) {
			t.Fatalf("echo b-%d: %v %v", i, f, err)
		}
	}
	if again := metricValue(t, s, "sluice_messages_delayed_total", "limit", "client_rate"); again <= delayed {
		t.Errorf("after the park, the second burst was not held back (delayed %v, then %v)", delayed, again)
	}
	msgs, _ := rec.snapshot()
	var second []time.Time
	for _, m := range msgs {
		if m.payload[0] == 'b' {
			second = append(second, m.at)
		}
	}
	if got, least := span(second[rate:]), minSpan(n-rate+1, rate, 1); got < least {
		t.Errorf("after the park, messages past the burst arrived in %v, faster than %d/s allows (%v)", got, rate, least)
	}
}
