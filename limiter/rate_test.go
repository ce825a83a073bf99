package limiter

import (
	"math"
	"math/big"
	"testing"
	"time"
)

const sec = int64(time.Second)

// bucketStep is one call on a Bucket at a time since it was made.
type bucketStep struct {
	at   int64  // now, in ns
	op   string // "reserve", "allow", "delay", "tokens"
	n    int64
	want int64 // the wait in ns, 1/0 for allow, or whole tokens
}

var bucketCases = []struct {
	name        string
	rate, burst int64
	steps       []bucketStep
}{
	{"disabled", 0, 0, []bucketStep{
		{0, "reserve", 1 << 40, 0},
		{0, "allow", 1 << 40, 1},
		{0, "delay", 1 << 40, 0},
		{0, "tokens", 0, 0},
	}},
	{"negative rate is disabled", -5, 10, []bucketStep{
		{0, "reserve", 100, 0},
		{0, "allow", 100, 1},
	}},
	{"default burst is one second", 10, 0, []bucketStep{
		{0, "tokens", 0, 10},
		{sec, "tokens", 0, 10}, // full stays full
		{sec, "reserve", 10, 0},
		{sec, "reserve", 1, 100 * int64(time.Millisecond)},
	}},
	{"refill is exact", 10, 10, []bucketStep{
		{0, "reserve", 10, 0},
		{0, "delay", 1, 100e6},
		{50e6, "delay", 1, 50e6},
		{50e6, "allow", 1, 0},
		{100e6, "allow", 1, 1},
		{100e6, "tokens", 0, 0},
		{350e6, "tokens", 0, 2}, // 2.5 tokens
		{350e6, "delay", 3, 50e6},
	}},
	{"wait rounds up to the nanosecond", 3, 1, []bucketStep{
		{0, "reserve", 1, 0},
		{0, "reserve", 1, 333333334},
		{333333333, "delay", 0, 1}, // a third of a nanotoken still owed
	}},
	{"burst caps the refill", 100, 5, []bucketStep{
		{0, "reserve", 5, 0},
		{10 * sec, "tokens", 0, 5},
		{10 * sec, "reserve", 6, 10e6},
	}},
	{"reserve goes into debt", 1e6, 1e6, []bucketStep{
		{0, "reserve", 3e6, 2 * sec},
		{0, "tokens", 0, -2e6},
		{sec, "reserve", 0, sec}, // half paid
		{sec, "allow", 1, 0},
		{2 * sec, "allow", 1, 0}, // out of debt, but empty
		{2 * sec, "delay", 1, 1000},
		{2*sec + 1000, "allow", 1, 1},
	}},
	{"allow refuses without taking", 10, 2, []bucketStep{
		{0, "allow", 2, 1},
		{0, "allow", 1, 0},
		{0, "allow", 1, 0},
		{100e6, "allow", 1, 1},
	}},
	{"allow takes a message larger than the burst when full", 1000, 100, []bucketStep{
		{0, "allow", 150, 1},
		{0, "tokens", 0, -50},
		{50e6, "allow", 1, 0}, // 0 tokens: debt paid, nothing earned yet
		{51e6, "allow", 1, 1},
		{51e6, "allow", 150, 0},     // not full: refused
		{51e6, "delay", 150, 100e6}, // until full
		{151e6, "allow", 150, 1},
	}},
	{"clock going back earns nothing", 10, 10, []bucketStep{
		{sec, "reserve", 10, 0},
		{0, "delay", 1, 100e6}, // measured from 0, but nothing earned
		{sec, "delay", 1, 100e6},
		{sec + 100e6, "allow", 1, 1},
	}},
	{"negative n costs nothing", 10, 10, []bucketStep{
		{0, "reserve", -5, 0},
		{0, "tokens", 0, 10},
	}},
	{"huge rate", math.MaxInt64, MaxTokens, []bucketStep{
		{0, "reserve", MaxTokens, 0},
		{0, "reserve", MaxTokens, 1}, // 4.3e18 nanotokens at 9.2e18 a ns
		{1, "tokens", 0, MaxTokens},
		{math.MaxInt64, "tokens", 0, MaxTokens},
	}},
	{"huge burst is clamped", 1, math.MaxInt64, []bucketStep{
		{0, "tokens", 0, MaxTokens},
		{0, "reserve", math.MaxInt64, 0}, // counts as MaxTokens
		{0, "tokens", 0, 0},
		{math.MaxInt64, "tokens", 0, MaxTokens}, // 292 years idle: no overflow
	}},
	{"debt is bounded", 1, 1, []bucketStep{
		{0, "reserve", math.MaxInt64, (MaxTokens - 1) * sec},
		{0, "reserve", math.MaxInt64, MaxTokens * sec},
		{0, "reserve", math.MaxInt64, MaxTokens * sec},
		{0, "tokens", 0, -MaxTokens},
	}},
}

func TestBucket(t *testing.T) {
	for _, tc := range bucketCases {
		t.Run(tc.name, func(t *testing.T) {
			b := NewBucket(tc.rate, tc.burst)
			for i, s := range tc.steps {
				var got int64
				switch s.op {
				case "reserve":
					got = int64(b.Reserve(s.at, s.n))
				case "allow":
					if b.Allow(s.at, s.n) {
						got = 1
					}
				case "delay":
					got = int64(b.Delay(s.at, s.n))
				case "tokens":
					got = b.Tokens(s.at)
				}
				if got != s.want {
					t.Fatalf("step %d: %s(%d, %d) = %d, want %d", i, s.op, s.at, s.n, got, s.want)
				}
			}
		})
	}
}

// TestBucketGreedyRate checks that a reader that always waits what Reserve
// says gets exactly the rate after the burst, for message and byte sizes.
func TestBucketGreedyRate(t *testing.T) {
	for _, tc := range []struct {
		rate, burst, n int64
	}{
		{5, 0, 1},
		{3, 1, 1},
		{1000, 10, 1},
		{1 << 20, 64 << 10, 1500},
		{1 << 20, 64 << 10, 1 << 20}, // messages larger than the burst
		{7, 7, 3},
	} {
		b := NewBucket(tc.rate, tc.burst)
		burst := min(tc.burst, MaxTokens)
		if burst <= 0 {
			burst = tc.rate
		}
		var now, granted int64
		const horizon = 100 * sec
		for now < horizon {
			granted += tc.n
			now += int64(b.Reserve(now, tc.n))
		}
		// By now every grant has conformed: granted ≤ burst + rate·now,
		// and the reader never waited longer than it had to.
		upper := burst + tc.rate*now/sec
		if granted > upper || granted < upper-tc.n {
			t.Errorf("rate %d burst %d n %d: granted %d by %v, want in (%d, %d]",
				tc.rate, tc.burst, tc.n, granted, time.Duration(now), upper-tc.n, upper)
		}
	}
}

func TestRateInbound(t *testing.T) {
	t.Run("disabled", func(t *testing.T) {
		var in Inbound
		if d := in.Reserve(0, FrameFirst, 1<<30); d != 0 {
			t.Errorf("Reserve = %v", d)
		}
		if !in.Allow(0, FrameControl, 1<<30) {
			t.Error("Allow refused")
		}
	})
	t.Run("a fragmented message is one message", func(t *testing.T) {
		in := NewInbound(2, 2, 0, 0)
		for i, kind := range []FrameKind{FrameFirst, FrameNext, FrameNext, FrameFirst, FrameNext} {
			if !in.Allow(0, kind, 10) {
				t.Fatalf("frame %d refused", i)
			}
		}
		if in.Allow(0, FrameFirst, 10) {
			t.Fatal("third message allowed")
		}
		if !in.Allow(0, FrameNext, 10) {
			t.Fatal("continuation of an allowed message refused for want of a message token")
		}
	})
	t.Run("control frames cost a message", func(t *testing.T) {
		in := NewInbound(10, 10, 0, 0)
		n := 0
		for in.Allow(0, FrameControl, 0) {
			n++
		}
		if n != 10 {
			t.Errorf("%d pings allowed at once, want the burst of 10", n)
		}
		if d := in.Reserve(0, FrameControl, 0); d != 100*time.Millisecond {
			t.Errorf("ping flood throttled for %v, want 100ms", d)
		}
	})
	t.Run("bytes count per frame", func(t *testing.T) {
		in := NewInbound(0, 0, 1000, 1000)
		if d := in.Reserve(0, FrameFirst, 600); d != 0 {
			t.Fatalf("first frame: %v", d)
		}
		if d := in.Reserve(0, FrameNext, 600); d != 200*time.Millisecond {
			t.Fatalf("second frame: %v, want 200ms", d)
		}
	})
	t.Run("allow takes from neither when one refuses", func(t *testing.T) {
		in := NewInbound(10, 10, 100, 100)
		if !in.Allow(0, FrameFirst, 101) { // > burst, but the bucket is full
			t.Fatal("oversized frame refused by a full bucket")
		}
		if in.Allow(0, FrameFirst, 1) {
			t.Fatal("allowed while the byte bucket is in debt")
		}
		if got := in.Messages.Tokens(0); got != 9 {
			t.Fatalf("message tokens %d after a refused frame, want 9", got)
		}
	})
	t.Run("the longer wait wins", func(t *testing.T) {
		in := NewInbound(1, 1, 1000, 1000)
		in.Reserve(0, FrameFirst, 1)
		if d := in.Reserve(0, FrameFirst, 1); d != time.Second {
			t.Fatalf("messages: %v", d)
		}
		if d := in.Reserve(0, FrameNext, 3000); d != 2*time.Second+2*time.Millisecond {
			t.Fatalf("bytes: %v", d)
		}
	})
}

// FuzzTokenBucket drives a Bucket with random times, sizes and calls and
// checks what must hold whatever the caller does: the level never exceeds
// the burst, no wait is negative, a refused Allow takes nothing, and
// everything granted by time T, once its debt is paid, is within
// burst + rate·T.
func FuzzTokenBucket(f *testing.F) {
	f.Add(int64(10), int64(0), []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add(int64(3), int64(1), []byte{1, 0, 0, 1, 0, 0, 2, 0, 0})
	f.Add(int64(1<<20), int64(64<<10), []byte{0, 255, 255, 1, 200, 0, 3, 7, 7})
	f.Add(int64(math.MaxInt64), int64(math.MaxInt64), []byte{0, 255, 255, 0, 255, 255})
	f.Add(int64(1), int64(1), []byte{0, 9, 9, 0, 9, 9, 3, 0, 0})
	f.Fuzz(func(t *testing.T, rate, burst int64, script []byte) {
		if rate <= 0 {
			rate = 0
		}
		b := new(Bucket)
		*b = NewBucket(rate, burst)
		if rate == 0 {
			if b.Reserve(0, 1) != 0 || !b.Allow(0, 1) {
				t.Fatal("disabled bucket limits")
			}
			return
		}
		capTokens := b.cap / nano
		var now, paidBy int64
		granted := new(big.Int)
		for len(script) >= 3 {
			op, x := script[0], int64(script[1])<<8|int64(script[2])
			script = script[3:]
			// The clock moves by x shifted by up to 31 bits: nanoseconds
			// for high rates, hours for low ones.
			now += x << (op >> 2 & 31)
			n := x
			ref := *b
			ref.refill(now)
			switch op & 3 {
			case 0:
				d := b.Reserve(now, n)
				if d < 0 {
					t.Fatalf("Reserve = %v", d)
				}
				granted.Add(granted, big.NewInt(min(n, MaxTokens)))
				paidBy = max(paidBy, now+int64(d))
			case 1:
				if b.Allow(now, n) {
					granted.Add(granted, big.NewInt(min(n, MaxTokens)))
					paidBy = max(paidBy, now+int64(b.Delay(now, 0)))
				} else if b.level != ref.level {
					t.Fatalf("refused Allow took tokens: %d -> %d", ref.level, b.level)
				}
			case 2:
				if d := b.Delay(now, n); d < 0 {
					t.Fatalf("Delay = %v", d)
				}
			case 3:
				if tok := b.Tokens(now); tok > capTokens {
					t.Fatalf("Tokens = %d > burst %d", tok, capTokens)
				}
			}
			if b.level > b.cap {
				t.Fatalf("level %d above burst %d", b.level, b.cap)
			}
		}
		// granted·1e9 ≤ cap + rate·paidBy, in exact arithmetic.
		lhs := new(big.Int).Mul(granted, big.NewInt(nano))
		rhs := new(big.Int).Mul(big.NewInt(rate), big.NewInt(paidBy))
		rhs.Add(rhs, big.NewInt(b.cap))
		if lhs.Cmp(rhs) > 0 {
			t.Fatalf("granted %v tokens by %v, more than burst %d + rate %d × T", granted, time.Duration(paidBy), capTokens, rate)
		}
	})
}

// rateBenchCases are Inbound limits the benchmarks run: disabled, one
// bucket, and both.
var rateBenchCases = []struct {
	name string
	in   Inbound
}{
	{"disabled", Inbound{}},
	{"messages", NewInbound(1e9, 0, 0, 0)},
	{"messages+bytes", NewInbound(1e9, 0, 1<<40, 0)},
}

func BenchmarkRateReserve(b *testing.B) {
	for _, bc := range rateBenchCases {
		b.Run(bc.name, func(b *testing.B) {
			in := bc.in
			b.ReportAllocs()
			var now int64
			for b.Loop() {
				now += 100
				in.Reserve(now, FrameFirst, 512)
			}
		})
	}
}

func BenchmarkRateAllow(b *testing.B) {
	for _, bc := range rateBenchCases {
		b.Run(bc.name, func(b *testing.B) {
			in := bc.in
			b.ReportAllocs()
			var now int64
			for b.Loop() {
				now += 100
				in.Allow(now, FrameFirst, 512)
			}
		})
	}
}

// BenchmarkRateReserveWithClock includes the clock read a reader makes.
func BenchmarkRateReserveWithClock(b *testing.B) {
	in := NewInbound(1e9, 0, 1<<40, 0)
	b.ReportAllocs()
	for b.Loop() {
		in.Reserve(Now(), FrameFirst, 512)
	}
}

// BenchmarkBucketParallel runs one Bucket per goroutine, as the proxy
// does, to show there is no hidden sharing.
func BenchmarkBucketParallel(b *testing.B) {
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		bk := NewBucket(1e9, 0)
		var now int64
		for pb.Next() {
			now += 100
			bk.Reserve(now, 1)
		}
	})
}
