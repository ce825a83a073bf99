package limiter

import (
	"fmt"
	"math/bits"
	"time"
)

// Now is monotonic nanoseconds since the process started: the clock every
// Bucket and Fair call takes. It reads the vDSO clock, not a system call,
// and a reader needs one reading per frame, which it can share with its
// read deadline. Readings from other clocks must not be mixed in.
func Now() int64 { return now() }

// MaxTokens is the largest burst and the largest single take a Bucket
// counts exactly; larger values count as MaxTokens. 2^32 tokens is 4 GiB
// when the bucket counts bytes, above any frame sluice accepts, and keeps
// every sum below in int64.
const MaxTokens = 1 << 32

// nano is the fixed-point scale of a Bucket's level: a token is 1e9
// nanotokens, so a rate of r tokens per second is exactly r nanotokens per
// nanosecond and refilling is one multiplication with no rounding.
const nano = int64(time.Second)

// maxDebt bounds how far Reserve can drive a Bucket below empty, so that a
// caller that ignores the waits cannot overflow the level.
const maxDebt = MaxTokens * nano

// Bucket is a token bucket for one client's inbound traffic: rate tokens a
// second, at most burst in hand. It counts messages or bytes, whichever
// the caller takes from it.
//
// It is cheap enough to ask per frame: the zero Bucket and any Bucket with
// rate 0 are disabled and every method returns after one branch; an
// enabled check is integer arithmetic on the time the caller passes in,
// without a clock read, a lock or an allocation.
//
// A Bucket is owned by its client's reader goroutine and is not safe for
// concurrent use. It starts full.
type Bucket struct {
	rate  int64 // tokens a second, so nanotokens a nanosecond; 0: disabled
	cap   int64 // burst, in nanotokens
	level int64 // nanotokens at time at; below zero is debt Reserve took
	at    int64 // the Now of the last refill
}

// NewBucket returns a full Bucket that refills rate tokens a second and
// holds at most burst. A rate of 0 or less disables it. A burst of 0 or
// less means one second's worth (burst = rate): a client may send a
// second's allowance at once after a quiet second, which absorbs the
// clumping of TCP and of reconnects, and never more. Burst is clamped to
// [1, MaxTokens].
func NewBucket(rate, burst int64) Bucket {
	if rate <= 0 {
		return Bucket{}
	}
	if burst <= 0 {
		burst = rate
	}
	burst = min(burst, MaxTokens)
	return Bucket{rate: rate, cap: burst * nano, level: burst * nano}
}

// Enabled reports whether b limits anything.
func (b *Bucket) Enabled() bool { return b.rate != 0 }

// Allow takes n tokens if the bucket holds them and reports whether it
// did; it takes nothing otherwise. It serves the close policy: a refused
// client is closed. A take larger than the burst is allowed when the
// bucket is full and leaves it in debt, so one large message is not
// refused for ever, but the tokens it lacked are paid back before anything
// else is allowed.
func (b *Bucket) Allow(now, n int64) bool {
	if b.rate == 0 {
		return true
	}
	return b.allow(now, n)
}

// allow is Allow past the disabled check, which stays small enough to be
// inlined into the read loop; so do the other fast paths below.
func (b *Bucket) allow(now, n int64) bool {
	b.refill(now)
	cost := cost(n)
	if b.level < min(cost, b.cap) {
		return false
	}
	b.take(cost)
	return true
}

// Reserve takes n tokens, going into debt if the bucket lacks them, and
// returns how long until they would have been in the bucket: how long the
// caller must stop reading before the next frame. It serves the throttle
// policy; a caller that always waits the returned time is held to the
// rate, and one that does not only deepens its debt (bounded by MaxTokens).
func (b *Bucket) Reserve(now, n int64) time.Duration {
	if b.rate == 0 {
		return 0
	}
	return b.reserve(now, n)
}

func (b *Bucket) reserve(now, n int64) time.Duration {
	b.refill(now)
	b.take(cost(n))
	return b.debtTime()
}

// Delay returns how long until Allow(n) would succeed, taking nothing.
func (b *Bucket) Delay(now, n int64) time.Duration {
	if b.rate == 0 {
		return 0
	}
	b.refill(now)
	short := min(cost(n), b.cap) - b.level
	if short <= 0 {
		return 0
	}
	return ceilDiv(short, b.rate)
}

// Tokens returns the whole tokens in the bucket at now; negative while in
// debt. A disabled bucket holds none.
func (b *Bucket) Tokens(now int64) int64 {
	if b.rate == 0 {
		return 0
	}
	b.refill(now)
	return b.level / nano
}

// refill adds what the time since the last refill earned, up to the burst.
// A now earlier than the last one (another clock, or a stale reading)
// earns nothing and does not move the bucket back.
func (b *Bucket) refill(now int64) {
	if now <= b.at {
		return
	}
	elapsed := now - b.at
	b.at = now
	if b.level >= b.cap {
		return
	}
	// need ≤ cap + maxDebt < 2^63. elapsed*rate is taken in 128 bits so
	// that a long idle client or a huge rate cannot overflow.
	need := uint64(b.cap - b.level)
	hi, lo := bits.Mul64(uint64(elapsed), uint64(b.rate))
	if hi != 0 || lo >= need {
		b.level = b.cap
		return
	}
	b.level += int64(lo)
}

// take removes cost nanotokens, keeping the debt within maxDebt.
func (b *Bucket) take(cost int64) {
	b.level = max(b.level-cost, -maxDebt) // level ≥ -maxDebt, cost ≤ maxDebt: no overflow
}

// debtTime is how long until the bucket is out of debt.
func (b *Bucket) debtTime() time.Duration {
	if b.level >= 0 {
		return 0
	}
	return ceilDiv(-b.level, b.rate)
}

// cost is n tokens in nanotokens, n clamped to [0, MaxTokens].
func cost(n int64) int64 {
	return min(max(n, 0), MaxTokens) * nano
}

// ceilDiv is ⌈a/b⌉ in nanoseconds for a ≥ 0, b > 0, without overflow.
func ceilDiv(a, b int64) time.Duration {
	q := a / b
	if a%b != 0 {
		q++
	}
	return time.Duration(q)
}

// FrameKind says what an inbound frame costs an Inbound limit.
type FrameKind uint8

const (
	// FrameFirst is the first or only frame of a data message: one message
	// and its bytes. A fragmented message is one message, counted when it
	// starts, so it is never refused half way under the close policy.
	FrameFirst FrameKind = iota
	// FrameNext is a continuation frame: its bytes only.
	FrameNext
	// FrameControl is a ping, pong or close: one message and its bytes.
	//
	// Control frames are not messages, but each one costs the proxy a
	// frame read and, for a ping, a pong on the writer, which is the work
	// a small message costs. Pricing them as messages bounds a ping flood
	// by the limit the operator already set, with no third knob, and a
	// client cannot add a control allowance to its message allowance. A
	// well-behaved client pings every few tens of seconds, which any burst
	// absorbs.
	FrameControl
)

// Inbound is one client's inbound limit: a message bucket and a byte
// bucket, either of which may be disabled. It is owned by the client's
// reader goroutine.
//
// Under the throttle policy the reader reserves each frame once its header
// is read and, if told to wait, stops reading the socket for that long:
//
//	now := limiter.Now()
//	if d := in.Reserve(now, kind, int64(h.Length)); d > 0 {
//		// stop reading for d; TCP backpressure reaches the client
//	}
//
// Under the close policy it asks Allow instead and closes the client when
// refused (1008 Policy Violation); a refused frame takes no tokens.
type Inbound struct {
	Messages Bucket
	Bytes    Bucket
}

// NewInbound returns a full Inbound limit of msgRate messages and byteRate
// bytes a second, with bursts as NewBucket reads them; 0 disables either.
func NewInbound(msgRate, msgBurst, byteRate, byteBurst int64) Inbound {
	return Inbound{Messages: NewBucket(msgRate, msgBurst), Bytes: NewBucket(byteRate, byteBurst)}
}

// Reserve takes what a frame of kind with n payload bytes costs and
// returns how long the reader must stop reading: the longer of the two
// buckets' waits.
func (in *Inbound) Reserve(now int64, kind FrameKind, n int64) time.Duration {
	if in.Messages.rate|in.Bytes.rate == 0 {
		return 0
	}
	return in.reserve(now, kind, n)
}

func (in *Inbound) reserve(now int64, kind FrameKind, n int64) time.Duration {
	var d time.Duration
	if kind != FrameNext {
		d = in.Messages.Reserve(now, 1)
	}
	return max(d, in.Bytes.Reserve(now, n))
}

// Allow takes what a frame of kind with n payload bytes costs if both
// buckets hold it, and reports whether they did; if either lacks it,
// neither is taken from.
func (in *Inbound) Allow(now int64, kind FrameKind, n int64) bool {
	if in.Messages.rate|in.Bytes.rate == 0 {
		return true
	}
	return in.allow(now, kind, n)
}

func (in *Inbound) allow(now int64, kind FrameKind, n int64) bool {
	msg := kind != FrameNext
	if msg && in.Messages.Delay(now, 1) > 0 || in.Bytes.Delay(now, n) > 0 {
		return false
	}
	if msg {
		in.Messages.Allow(now, 1)
	}
	in.Bytes.Allow(now, n)
	return true
}

// RatePolicy is what happens to a client that sends faster than its
// Inbound limit.
type RatePolicy uint8

const (
	// Throttle stops reading the client's socket until its bucket has
	// refilled, so TCP pushes back on it and nothing is lost.
	Throttle RatePolicy = iota
	// CloseOverLimit closes the client (1008 Policy Violation).
	CloseOverLimit
)

var ratePolicyNames = [...]string{Throttle: "throttle", CloseOverLimit: "close"}

func (p RatePolicy) String() string {
	if int(p) < len(ratePolicyNames) {
		return ratePolicyNames[p]
	}
	return fmt.Sprintf("RatePolicy(%d)", uint8(p))
}

// ParseRatePolicy reads a rate policy name: throttle or close.
func ParseRatePolicy(s string) (RatePolicy, error) {
	for p, name := range ratePolicyNames {
		if s == name {
			return RatePolicy(p), nil
		}
	}
	return 0, fmt.Errorf("limiter: unknown rate policy %q (want throttle or close)", s)
}
