//go:build linux

package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/latency"
)

// Clients, all gorilla/websocket, independent of sluice.

const (
	// dialTimeout bounds a TCP connect plus the WebSocket handshake.
	dialTimeout = 10 * time.Second
	// firstSource and sources: clients bind 127.0.0.2 to 127.0.0.255 in
	// turn, so that tens of thousands of connections do not run out of one
	// address's ephemeral ports.
	firstSource = 2
	sources     = 254
)

// sourceAddr is the local address of client i.
func sourceAddr(i int) *net.TCPAddr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(firstSource+i%sources))}
}

// socketOpts is applied to a client socket before it connects.
type socketOpts struct {
	rcvBuf int // SO_RCVBUF; 0 = kernel default
	mss    int // TCP_MAXSEG; 0 = kernel default
}

// ipBindAddressNoPort is Linux's IP_BIND_ADDRESS_NO_PORT (linux/in.h),
// which package syscall lacks.
const ipBindAddressNoPort = 0x18

// control sets the options on the raw socket. Every client binds its
// source address with IP_BIND_ADDRESS_NO_PORT, so its port is picked at
// connect, unique per source and destination (as for any connect), instead
// of at bind, where the port is taken from the whole ephemeral range and
// closed to every connect() until its TIME_WAIT ends: thousands of clients
// a run, run after run, would otherwise leave a proxy's own connections to
// the backend (all from 127.0.0.1 to one port) short of ports.
func (o socketOpts) control(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
		if serr == nil && o.rcvBuf > 0 {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, o.rcvBuf)
		}
		if serr == nil && o.mss > 0 {
			serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, o.mss)
		}
	})
	return errors.Join(err, serr)
}

// dialWS opens client i's WebSocket to url from client i's source address.
// readBuf sizes gorilla's read buffer (small for idle fleets); write
// buffers come from a pool, so idle connections hold none.
func dialWS(ctx context.Context, url string, i int, opts socketOpts, readBuf int) (*websocket.Conn, error) {
	nd := net.Dialer{LocalAddr: sourceAddr(i), Timeout: dialTimeout, Control: opts.control}
	d := websocket.Dialer{
		NetDialContext:   nd.DialContext,
		HandshakeTimeout: dialTimeout,
		ReadBufferSize:   readBuf,
		WriteBufferSize:  256,
		WriteBufferPool:  writePool,
	}
	c, resp, err := d.DialContext(ctx, url, nil)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("dial %s: %w (HTTP %s)", url, err, resp.Status)
		}
		return nil, fmt.Errorf("dial %s: %w", url, err)
	}
	return c, nil
}

// writePool shares write buffers among client connections.
var writePool = &sync.Pool{}

// connectAll calls dial for clients 0 to n-1, at most workers at once (so
// the target's listen backlog is not flooded). When strict it stops at the
// first failure; otherwise it counts failures and keeps the first.
func connectAll(ctx context.Context, n, workers int, strict bool, dial func(ctx context.Context, i int) error) (failed int, firstErr error) {
	var mu sync.Mutex
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := atomic.Int64{}
	var wg sync.WaitGroup
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := dial(ctx, i); err != nil {
					mu.Lock()
					failed++
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					if strict {
						cancel()
					}
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return failed, firstErr
}

// --- broadcast clients ------------------------------------------------------

// fastClient reads every message as it comes and measures it. Its fields
// are owned by its fastReader goroutine until that returns.
type fastClient struct {
	conn     *websocket.Conn
	lat      latency.Histogram // recv time - send time, while counting
	received int64             // messages while counting
	gaps     int64             // messages missing between received ones, while counting
	disorder int64             // messages whose sequence number went backwards
	ended    string            // how the connection ended while counting; "" if it did not
	done     chan struct{}
}

// fastReader is a fast client's goroutine. Messages count while counting
// is set; gaps are judged against the message before, counted or not.
func (f *fastClient) fastReader(counting *atomic.Bool) {
	defer close(f.done)
	var hdr [headerLen]byte
	var last uint64
	for {
		now, err := readMessageHeader(f.conn, hdr[:])
		if err != nil {
			if counting.Load() {
				f.ended = outcome(err)
			}
			return
		}
		seq := binary.BigEndian.Uint64(hdr[:])
		sent := int64(binary.BigEndian.Uint64(hdr[8:]))
		if counting.Load() {
			f.received++
			f.lat.Record(time.Duration(now - sent))
			switch {
			case last == 0:
			case seq > last+1:
				f.gaps += int64(seq - last - 1)
			case seq <= last:
				f.disorder++
			}
		}
		last = max(last, seq)
	}
}

// slowClient reads until stopAt, then stops reading (its small receive
// window closes and the sender's backlog grows) until resumed, then reads
// on to find out how it was closed. Its fields are owned by its
// slowReader goroutine until done closes.
type slowClient struct {
	conn    *websocket.Conn
	resume  chan struct{} // closed by the harness after setting a read deadline
	outcome string        // how the connection ended, or "open"
	done    chan struct{}
}

// slowReader is a slow client's goroutine.
func (s *slowClient) slowReader(stopAt *atomic.Int64) {
	defer close(s.done)
	read := func() error {
		_, rd, err := s.conn.NextReader()
		if err == nil {
			_, err = io.Copy(io.Discard, rd)
		}
		return err
	}
	for time.Now().UnixNano() < stopAt.Load() {
		if err := read(); err != nil {
			s.outcome = outcome(err)
			return
		}
	}
	<-s.resume
	for {
		if err := read(); err != nil {
			s.outcome = outcome(err)
			return
		}
	}
}

// outcome names how a read ended: the close code received, "eof" (closed
// without a close frame), "rst" (reset), "open" (the read deadline passed)
// or "error".
func outcome(err error) string {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case errors.As(err, &ce) && ce.Code == websocket.CloseAbnormalClosure:
		return "eof" // gorilla's name for an EOF with no close frame
	case errors.As(err, &ce):
		return fmt.Sprint(ce.Code)
	case errors.As(err, &ne) && ne.Timeout():
		return "open"
	case errors.Is(err, syscall.ECONNRESET):
		return "rst"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return "eof"
	}
	return "error"
}

// --- idle clients -----------------------------------------------------------

// idleFleet is a set of idle connections that read only to answer pings.
type idleFleet struct {
	pings    atomic.Int64 // pings received, all connections
	holding  atomic.Bool  // set while the hold window runs
	stopping atomic.Bool  // set before the harness closes the connections

	mu          sync.Mutex
	conns       []*websocket.Conn // guarded by mu
	early       int               // ended before the hold; guarded by mu
	dropped     int               // ended during the hold; guarded by mu
	dropReasons map[string]int    // guarded by mu
	readers     sync.WaitGroup
}

// add starts an idle reader on c.
func (f *idleFleet) add(c *websocket.Conn) {
	f.mu.Lock()
	f.conns = append(f.conns, c)
	f.mu.Unlock()
	f.readers.Add(1)
	go f.idleReader(c)
}

// idleReader reads c (gorilla answers pings while reading) until it ends,
// and counts an end it did not cause.
func (f *idleFleet) idleReader(c *websocket.Conn) {
	defer f.readers.Done()
	pong := c.PingHandler()
	c.SetPingHandler(func(data string) error {
		f.pings.Add(1)
		return pong(data)
	})
	for {
		_, rd, err := c.NextReader()
		if err == nil {
			_, err = io.Copy(io.Discard, rd)
		}
		if err == nil {
			continue
		}
		if f.stopping.Load() {
			return
		}
		f.mu.Lock()
		if f.holding.Load() {
			f.dropped++
			if f.dropReasons == nil {
				f.dropReasons = map[string]int{}
			}
			f.dropReasons[outcome(err)]++
		} else {
			f.early++
		}
		f.mu.Unlock()
		return
	}
}

// closeAll closes every connection's socket and waits for the readers,
// at most timeout.
func (f *idleFleet) closeAll(timeout time.Duration) {
	f.stopping.Store(true)
	f.mu.Lock()
	conns := f.conns
	f.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	waitGroup(&f.readers, timeout)
}

// waitGroup waits for wg, at most timeout; false if it timed out.
func waitGroup(wg *sync.WaitGroup, timeout time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// --- latency ------------------------------------------------------------------

// millis is a latency in milliseconds; NaN (no sample) is null in JSON.
type millis float64

func (m millis) MarshalJSON() ([]byte, error) {
	if math.IsNaN(float64(m)) || math.IsInf(float64(m), 0) {
		return []byte("null"), nil
	}
	return json.Marshal(float64(m))
}

// quantileMs is h's q-quantile in milliseconds, NaN when empty.
func quantileMs(h *latency.Histogram, q float64) millis {
	if h.Count() == 0 {
		return millis(math.NaN())
	}
	return asMillis(h.Quantile(q))
}

// maxMs is h's largest value in milliseconds, NaN when empty.
func maxMs(h *latency.Histogram) millis {
	if h.Count() == 0 {
		return millis(math.NaN())
	}
	return asMillis(h.Max())
}

func asMillis(d time.Duration) millis { return millis(float64(d.Microseconds()) / 1000) }

// readMessageHeader reads the next message's first len(hdr) bytes into
// hdr, notes the time they arrived (ns), and discards the rest of it.
func readMessageHeader(c *websocket.Conn, hdr []byte) (now int64, err error) {
	_, rd, err := c.NextReader()
	if err == nil {
		_, err = io.ReadFull(rd, hdr)
	}
	now = time.Now().UnixNano()
	if err == nil {
		_, err = io.Copy(io.Discard, rd)
	}
	return now, err
}
