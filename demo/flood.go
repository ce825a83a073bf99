package demo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// floodMessage is what the flooder sends over and over: a buggy client
// re-subscribing in a loop.
const floodMessage = `{"op":"subscribe","channel":"feed"}`

// floodTick is how often a paced flooder writes what is due, in one write.
const floodTick = 10 * time.Millisecond

// floodRate is the -flood flag: messages a second, 0 for no flooder, or
// floodMax for as fast as the socket takes them. Bare -flood means max.
type floodRate int

const floodMax floodRate = -1

// maxFloodRate bounds a paced flooder; faster is -flood=max.
const maxFloodRate = 1_000_000

func (r *floodRate) String() string {
	if r == nil || *r == 0 {
		return "0"
	}
	if *r == floodMax {
		return "max"
	}
	return strconv.Itoa(int(*r))
}

func (r *floodRate) Set(s string) error {
	switch s {
	case "max", "true":
		*r = floodMax
		return nil
	case "false":
		*r = 0
		return nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > maxFloodRate {
		return fmt.Errorf("want messages per second from 0 (no flooder) to %d, or max", maxFloodRate)
	}
	*r = floodRate(n)
	return nil
}

// IsBoolFlag lets a bare -flood mean -flood=max.
func (r *floodRate) IsBoolFlag() bool { return true }

// describe is the rate for people: "2,000 messages/s" or "as fast as it can".
func (r floodRate) describe() string {
	if r == floodMax {
		return "as fast as it can"
	}
	return thousands(uint64(r)) + " messages/s"
}

// flooder is one client that reads the feed like a fast client and sends
// floodMessage at its rate the whole time: what inbound protection is
// for. Its floodWriter is the only goroutine that writes to its socket;
// its floodReader reads the feed and hands pongs and the close echo to
// the writer. The demo ends it at the end of the phase by closing its
// socket, which also unblocks a write TCP is holding back.
type flooder struct {
	url  string
	rate floodRate
	wg   sync.WaitGroup

	sent atomic.Uint64 // messages written whole to the socket

	// Written by the flooder's goroutines before wg.Done, read after wait.
	connected time.Time // zero: never connected
	stopped   time.Time // the phase ended or the connection did
	received  uint64    // feed messages read
	outcome   string    // how the connection ended
}

func newFlooder(u string, rate floodRate) *flooder { return &flooder{url: u, rate: rate} }

// start connects the flooder and floods until ctx ends.
func (fl *flooder) start(ctx context.Context) {
	fl.wg.Add(1)
	go fl.floodWriter(ctx)
}

func (fl *flooder) wait() { fl.wg.Wait() }

// ran is how long the flooder was connected.
func (fl *flooder) ran() time.Duration {
	if fl.connected.IsZero() {
		return 0
	}
	return fl.stopped.Sub(fl.connected)
}

// sentRate is what the flooder got onto the wire, messages a second.
func (fl *flooder) sentRate() float64 { return perSecond(int64(fl.sent.Load()), fl.ran()) }

// perSecond is n over d, 0 for no time.
func perSecond(n int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

// floodWriter dials, starts the reader, and writes floodMessage at the
// rate and the reader's replies until ctx ends or the connection does.
func (fl *flooder) floodWriter(ctx context.Context) {
	defer fl.wg.Done()
	c, err := dialFeed(ctx, fl.url, false)
	if err != nil {
		fl.outcome = "could not connect: " + err.Error()
		if ctx.Err() != nil {
			fl.outcome = "never connected (the run ended first)"
		}
		return
	}
	fl.connected = time.Now()
	replies := make(chan []byte, 4)
	c.replies = replies
	readerDone := make(chan struct{})
	fl.wg.Add(1)
	go fl.floodReader(ctx, c, readerDone)
	// Closing the socket ends a write TCP holds back, and the reader.
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer func() {
		stop()
		c.Close()
		<-readerDone
		fl.stopped = time.Now()
	}()

	frame := ws.MustCompileFrame(ws.MaskFrame(ws.NewTextFrame([]byte(floodMessage))))
	perTick := 256 // as fast as it can: this many a write, back to back
	ready := make(chan time.Time)
	close(ready) // always ready: as fast as it can
	tick := (<-chan time.Time)(ready)
	if fl.rate != floodMax {
		perTick = max(1, int(int64(fl.rate)*int64(floodTick)/int64(time.Second))+1)
		t := time.NewTicker(floodTick)
		defer t.Stop()
		tick = t.C
	}
	batch := bytes.Repeat(frame, perTick)
	// due is what the schedule has asked for so far; what fell due while
	// TCP held a write back is skipped, not sent in a burst later.
	var due uint64
	write := func(b []byte, deadline time.Time) error {
		c.SetWriteDeadline(deadline)
		_, err := c.Write(b)
		return err
	}
	for {
		n := perTick
		select {
		case r := <-replies:
			if write(r, time.Now().Add(time.Second)) != nil {
				return
			}
			continue
		case <-readerDone:
			select { // the close echo, if the reader left one
			case r := <-replies:
				write(r, time.Now().Add(time.Second))
			default:
			}
			return
		case <-ctx.Done():
			return
		case now := <-tick:
			if fl.rate != floodMax {
				want := uint64(now.Sub(fl.connected).Seconds() * float64(fl.rate))
				n = int(min(want-min(due, want), uint64(perTick)))
				due = max(due, want)
			}
		}
		if n == 0 {
			continue
		}
		if write(batch[:n*len(frame)], time.Time{}) != nil {
			return
		}
		fl.sent.Add(uint64(n))
	}
}

// floodReader reads the feed as a fast client does, until the connection
// ends.
func (fl *flooder) floodReader(ctx context.Context, c *clientConn, done chan<- struct{}) {
	defer fl.wg.Done()
	defer close(done)
	var stamp [16]byte
	for {
		if _, _, err := readStamped(c, stamp[:]); err != nil {
			fl.outcome = closeOutcome(err)
			var ce wsutil.ClosedError
			if ctx.Err() != nil && !errors.As(err, &ce) {
				fl.outcome = "connected until the demo stopped it"
			}
			return
		}
		fl.received++
	}
}
