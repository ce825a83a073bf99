package proxy

// Inbound protection: how fast each client may send, and how fast all of
// them together may reach the backend (Options.ClientRate,
// Options.UpstreamMaxMessagesPerSecond). The client's reader asks before
// it reads a frame's payload; under the throttle policy it stops reading
// until the frame is due, so TCP pushes back on the client and nothing is
// lost; under the close policy a client over its limit is closed with
// 1008. A session without limits has no rate state (session.rate is nil) and
// pays one branch per frame.

import (
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/limiter"
)

// RateLimit bounds what one client may send.
type RateLimit struct {
	// MessagesPerSecond and BytesPerSecond are token-bucket rates; 0
	// means no limit. A fragmented message is one message, counted when
	// it starts; its bytes count as its frames arrive. Pings and pongs
	// cost a message each, so a ping flood is bounded too; a close always
	// passes.
	MessagesPerSecond int64
	BytesPerSecond    int64
	// Burst is how much of each rate a client may send at once after a
	// quiet spell: Burst × rate tokens; default one second's worth.
	Burst time.Duration
	// Policy is what happens past the limit: limiter.Throttle (stop
	// reading until the frame is due) or limiter.CloseOverLimit (1008).
	Policy limiter.RatePolicy
	// ThrottleMax closes a client that has been held back without a break
	// for longer than this (1008, rate_limit); 0 means never.
	ThrottleMax time.Duration
}

func (r RateLimit) enabled() bool { return r.MessagesPerSecond > 0 || r.BytesPerSecond > 0 }

// burstOf is the burst of a bucket of rate tokens a second.
func (r RateLimit) burstOf(rate int64) int64 {
	if rate <= 0 {
		return 0
	}
	return max(1, int64(float64(rate)*r.Burst.Seconds()))
}

// clientRate is a client leg's rate state, owned by its reader.
type clientRate struct {
	in    limiter.Inbound
	fair  limiter.FairClient
	since int64       // limiter.Now when the current unbroken throttling began; 0: none
	timer *time.Timer // waits out a throttle; made on the first
	// last is limiter.Now at the end of the latest wait, for status pages
	// and the throttled-clients gauge.
	last atomic.Int64
}

// throttledWithin is how recent a wait must be for a client to count as
// throttled now.
const throttledWithin = time.Second

func (r *clientRate) throttledNow(now int64) bool {
	last := r.last.Load()
	return last != 0 && time.Duration(now-last) < throttledWithin
}

// newClientRate is the rate state of a client leg, or nil when the server
// has no inbound limit.
func (s *Server) newClientRate() *clientRate {
	o := &s.opts.ClientRate
	if !o.enabled() && s.fair == nil {
		return nil
	}
	return &clientRate{in: limiter.NewInbound(o.MessagesPerSecond, o.burstOf(o.MessagesPerSecond),
		o.BytesPerSecond, o.burstOf(o.BytesPerSecond))}
}

// admit decides, before src's frame with header h is read on, whether it
// may go: at once, after a wait (throttle, or the upstream cap), or not at
// all (close). It returns readerNext to go on.
func (s *session) admit(src *leg, h ws.Header) int {
	r := src.s.rate
	kind := limiter.FrameNext
	switch {
	case h.OpCode == ws.OpClose:
		return readerNext // a goodbye is never held back
	case h.OpCode.IsControl():
		kind = limiter.FrameControl
	case h.OpCode != ws.OpContinuation:
		kind = limiter.FrameFirst
	}
	o := &s.srv.opts.ClientRate
	now := limiter.Now()
	if o.Policy == limiter.CloseOverLimit {
		if !r.in.Allow(now, kind, h.Length) {
			s.end(causeRateLimit, nil)
			return readerDraining
		}
	} else if d := r.in.Reserve(now, kind, h.Length); d > 0 {
		if !s.throttle(src, r, d, limitClient) {
			return readerDraining
		}
		now = limiter.Now()
	} else {
		r.since = 0
	}
	if s.srv.fair != nil && kind != limiter.FrameNext {
		if d := s.srv.fair.Reserve(&r.fair, now); d > 0 && !s.throttle(src, r, d, limitUpstream) {
			return readerDraining
		}
	}
	return readerNext
}

// Labels of the throttle metrics: which limit held a client back.
const (
	limitClient   = 0 // its own rate
	limitUpstream = 1 // the cap on all clients toward the backend
)

var limitNames = [2]string{limitClient: "client_rate", limitUpstream: "upstream_cap"}

// throttle stops reading src for d. It reports false when the session
// ended meanwhile, or when src has been held back longer than
// ThrottleMax, which ends it.
func (s *session) throttle(src *leg, r *clientRate, d time.Duration, limit int) bool {
	now := limiter.Now()
	if r.since == 0 {
		r.since = now
	}
	if max := s.srv.opts.ClientRate.ThrottleMax; max > 0 && time.Duration(now-r.since)+d > max {
		s.end(causeRateLimit, nil)
		return false
	}
	m := s.srv.metrics
	m.delayed[limit].Inc()
	m.throttleSeconds[limit].Add(d.Seconds())
	if r.timer == nil {
		r.timer = time.NewTimer(d)
	} else {
		r.timer.Reset(d)
	}
	// The wait is sluice's doing, not a client stalling mid-frame.
	s.frames.throttled.Store(true)
	defer s.frames.throttled.Store(false)
	ended := s.endedSignal()
	select {
	case <-r.timer.C:
		r.last.Store(limiter.Now())
		return true
	case <-ended:
		r.timer.Stop()
		return false
	}
}

// endedSignal is closed when the session is aborted; made on first use,
// by a throttled reader only.
func (s *session) endedSignal() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended == nil {
		s.ended = make(chan struct{})
		if s.aborted {
			close(s.ended)
		}
	}
	return s.ended
}
