package limiter

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// dataSeg makes a data segment of size bytes (at least 8) whose first
// eight bytes carry id, so tests can tell segments apart after a Take.
func dataSeg(id uint64, size int, start, end bool) *Segment {
	s := NewSegment(size)
	b := (*s.Buf)[:size]
	clear(b)
	binary.BigEndian.PutUint64(b, id)
	*s.Buf = b
	s.Start, s.End = start, end
	return s
}

// msg makes a single-frame message.
func msg(id uint64, size int) *Segment { return dataSeg(id, size, true, true) }

// ctlSeg makes a two-byte control frame tagged with tag.
func ctlSeg(tag byte) *Segment {
	s := NewSegment(2)
	*s.Buf = append(*s.Buf, 0x89, tag)
	return s
}

func idOf(s *Segment) uint64 { return binary.BigEndian.Uint64(s.Bytes()) }

// label names a taken segment for comparisons: "c<tag>" for a control
// frame, "close" for a close frame, "d<id>" for data.
func label(s *Segment) string {
	switch {
	case s.Close:
		return "close"
	case s.Control:
		return fmt.Sprintf("c%d", (*s.Buf)[1])
	}
	return fmt.Sprintf("d%d", idOf(s))
}

func labels(segs []*Segment) []string {
	out := make([]string, len(segs))
	for i, s := range segs {
		out[i] = label(s)
	}
	return out
}

func freeAll(segs []*Segment) {
	for _, s := range segs {
		s.Free()
	}
}

func mustPush(t *testing.T, q *Queue, s *Segment) {
	t.Helper()
	if err := q.Push(s); err != nil {
		s.Free()
		t.Fatalf("Push(%s): %v", label(s), err)
	}
}

// take runs one Take with a fresh batch of capacity n and returns the
// labels of what it got, freeing the segments.
func take(t *testing.T, q *Queue, n int, maxBytes int64) []string {
	t.Helper()
	segs, err := q.Take(make([]*Segment, 0, n), maxBytes)
	if err != nil {
		t.Fatalf("Take: %v", err)
	}
	l := labels(segs)
	freeAll(segs)
	return l
}

// takeWant runs one Take of capacity n and fails unless it got want.
func takeWant(t *testing.T, q *Queue, n int, want ...string) {
	t.Helper()
	if got := take(t, q, n, 1<<20); !slices.Equal(got, want) {
		t.Fatalf("Take = %v, want %v", got, want)
	}
}

// bigCfg bounds nothing the tests reach unless they mean to.
func bigCfg(p Policy) *Config {
	return &Config{Policy: p, MaxMessages: 1000, MaxBytes: 1 << 30, LowWater: 0.5, KeepNewest: 1}
}

// asyncPush pushes s from a new goroutine; the result arrives on the
// returned channel.
func asyncPush(q *Queue, s *Segment) <-chan error {
	done := make(chan error, 1)
	go func() { done <- q.Push(s) }()
	return done
}

// returned reports whether ch has a value, without blocking.
func returned(ch <-chan error) (error, bool) {
	select {
	case err := <-ch:
		return err, true
	default:
		return nil, false
	}
}

// drain plays a writer to the end of its burst: it takes batches of
// capacity n until Take fails, and returns their labels and the error.
func drain(t *testing.T, q *Queue, n int) ([]string, error) {
	t.Helper()
	var got []string
	for {
		segs, err := q.Take(make([]*Segment, 0, n), 1<<20)
		if err != nil {
			if len(segs) != 0 {
				t.Fatalf("Take returned %v with %v", labels(segs), err)
			}
			return got, err
		}
		got = append(got, labels(segs)...)
		freeAll(segs)
	}
}

// burstWriter runs a queue's writer the way a session does (proxy
// leg.kick and session.write): whoever pushes starts a writer goroutine
// unless one runs; the writer takes batches until Take returns ErrIdle or
// ErrClosed, or until it has taken a close frame; on ErrIdle it says it
// stopped, then looks once more (Pending), so that nothing pushed
// meanwhile waits without a writer. Producers push through its Push,
// PushControl and PushClose.
type burstWriter struct {
	tb       testing.TB
	q        *Queue
	batch    int
	maxBytes int64
	// handle sees each batch before it is freed. It runs on the writer of
	// the moment; the writers run one at a time, so what it touches needs
	// no lock.
	handle func(segs []*Segment)

	writing  atomic.Bool // a writer runs or is being started
	wg       sync.WaitGroup
	starts   atomic.Int64  // writer goroutines started
	holding  atomic.Int32  // writers between a Take that returned segments and the next
	done     chan struct{} // closed once a writer has taken the close frame or met ErrClosed
	doneOnce sync.Once
}

// newBurstWriter makes q's writers take batches of capacity batch (at most
// maxBytes) and show them to handle, which may be nil.
func newBurstWriter(tb testing.TB, q *Queue, batch int, maxBytes int64, handle func([]*Segment)) *burstWriter {
	return &burstWriter{tb: tb, q: q, batch: batch, maxBytes: maxBytes, handle: handle, done: make(chan struct{})}
}

func (w *burstWriter) Push(s *Segment) error {
	err := w.q.Push(s)
	if err == nil {
		w.kick()
	}
	return err
}

func (w *burstWriter) PushControl(s *Segment) error {
	err := w.q.PushControl(s)
	if err == nil {
		w.kick()
	}
	return err
}

func (w *burstWriter) PushClose(s *Segment, first bool) bool {
	ok := w.q.PushClose(s, first)
	w.kick()
	return ok
}

// kick starts a writer unless one runs.
func (w *burstWriter) kick() {
	if w.writing.CompareAndSwap(false, true) {
		w.starts.Add(1)
		w.wg.Add(1)
		go w.writeBurst()
	}
}

// writeBurst is one writer goroutine: one burst of Takes.
func (w *burstWriter) writeBurst() {
	defer w.wg.Done()
	batch := make([]*Segment, 0, w.batch)
	for {
		segs, err := w.q.Take(batch[:0], w.maxBytes)
		switch {
		case errors.Is(err, ErrIdle):
			w.writing.Store(false)
			if w.q.Pending() && w.writing.CompareAndSwap(false, true) {
				continue
			}
			return
		case errors.Is(err, ErrClosed):
			w.finish()
			return
		case err != nil:
			w.tb.Errorf("Take: %v", err)
			return
		}
		if w.holding.Add(1) != 1 {
			w.tb.Error("two writers hold batches at once")
		}
		if w.handle != nil {
			w.handle(segs)
		}
		closed := segs[len(segs)-1].Close
		freeAll(segs)
		w.holding.Add(-1)
		if closed {
			w.finish()
			return
		}
	}
}

func (w *burstWriter) finish() { w.doneOnce.Do(func() { close(w.done) }) }

// wait waits for every writer started so far to end. Call it only once
// nothing can start another: every push has returned and the queue is
// closed.
func (w *burstWriter) wait() { w.wg.Wait() }

func TestTakeOrder(t *testing.T) {
	q := NewQueue(bigCfg(Evict), nil, nil)
	defer q.Close()
	mustPush(t, q, msg(1, 16))
	mustPush(t, q, dataSeg(2, 16, true, false))
	if err := q.PushControl(ctlSeg(1)); err != nil {
		t.Fatalf("PushControl on an empty lane: %v", err)
	}
	mustPush(t, q, dataSeg(3, 16, false, true))
	if err := q.PushControl(ctlSeg(2)); err != nil {
		t.Fatalf("PushControl: %v", err)
	}
	takeWant(t, q, 64, "c1", "c2", "d1", "d2", "d3")
	if q.Bytes() != 0 || q.Messages() != 0 {
		t.Fatalf("after draining: Bytes %d Messages %d, want 0 0", q.Bytes(), q.Messages())
	}
}

// A full priority lane makes the forwarder wait, never drops its frame;
// sluice's own ping still fits, once, and is coalesced while it waits.
func TestControlLaneBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue(bigCfg(Evict), nil, nil)
		defer q.Close()
		for i := range ctlSlots {
			if err := q.PushControl(ctlSeg(byte(i))); err != nil {
				t.Fatalf("PushControl %d: %v", i, err)
			}
		}
		pushed := make(chan error, 1)
		go func() { pushed <- q.PushControl(ctlSeg(99)) }()
		synctest.Wait()
		select {
		case err := <-pushed:
			t.Fatalf("PushControl beyond ctlSlots returned %v at once, want it to wait", err)
		default:
		}
		own := ctlSeg(100)
		if !q.PushPing(own) {
			t.Fatal("PushPing refused on a lane full of forwarded frames")
		}
		second := ctlSeg(101)
		if q.PushPing(second) {
			t.Fatal("a second own ping was queued while the first waits")
		}
		second.Free()
		got := take(t, q, 64, 1<<20)
		if len(got) != ctlSlots+1 || got[ctlSlots] != "c100" {
			t.Fatalf("Take = %v, want %d forwarded frames then c100", got, ctlSlots)
		}
		synctest.Wait()
		if err := <-pushed; err != nil {
			t.Fatalf("the waiting PushControl: %v", err)
		}
		takeWant(t, q, 64, "c99")
		if !q.PushPing(ctlSeg(102)) {
			t.Fatal("PushPing refused once the previous ping was written")
		}
	})
}

// A forwarder waiting on a full lane is let go when the queue closes.
func TestControlLaneWaitEndsOnClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue(bigCfg(Evict), nil, nil)
		for i := range ctlSlots {
			if err := q.PushControl(ctlSeg(byte(i))); err != nil {
				t.Fatalf("PushControl %d: %v", i, err)
			}
		}
		pushed := make(chan error, 1)
		late := ctlSeg(99)
		go func() { pushed <- q.PushControl(late) }()
		synctest.Wait()
		q.Close()
		if err := <-pushed; !errors.Is(err, ErrClosed) {
			t.Fatalf("PushControl after Close = %v, want ErrClosed", err)
		}
		late.Free()
	})
}

func TestCloseFrame(t *testing.T) {
	tests := []struct {
		name  string
		first bool
		batch int      // capacity of each Take
		want  []string // labels of every Take, one string per batch
	}{
		{"after data", false, 64, []string{"c1 d1 d2 d3 close"}},
		{"after data small batches", false, 2, []string{"c1 d1", "d2 d3", "close"}},
		{"first", true, 64, []string{"c1 close"}},
		{"first small batches", true, 1, []string{"c1 close"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewBudget(BudgetConfig{})
			cfg := bigCfg(Evict)
			cfg.SlowAge = time.Second
			q := NewQueue(cfg, b, nil)
			defer q.Close()
			for id := uint64(1); id <= 3; id++ {
				mustPush(t, q, msg(id, 32))
			}
			if err := q.PushControl(ctlSeg(1)); err != nil {
				t.Fatalf("PushControl: %v", err)
			}
			if !q.PushClose(closeSeg(), tt.first) {
				t.Fatal("PushClose refused on an open queue")
			}
			if tt.first {
				if q.Bytes() != 0 || q.Messages() != 0 || b.Stats().QueuedBytes != 0 {
					t.Fatalf("priority close kept data: Bytes %d Messages %d budget %d",
						q.Bytes(), q.Messages(), b.Stats().QueuedBytes)
				}
			}

			// Nothing is accepted once a close is queued.
			late := msg(9, 32)
			if err := q.Push(late); !errors.Is(err, ErrClosed) {
				t.Fatalf("Push after PushClose = %v, want ErrClosed", err)
			}
			late.Free()
			lateCtl := ctlSeg(9)
			if err := q.PushControl(lateCtl); !errors.Is(err, ErrClosed) {
				t.Fatalf("PushControl after PushClose = %v, want ErrClosed", err)
			}
			lateCtl.Free()
			lateClose := closeSeg()
			if q.PushClose(lateClose, false) {
				t.Fatal("a second PushClose accepted")
			}
			lateClose.Free()

			var got []string
			for range tt.want {
				got = append(got, strings.Join(take(t, q, tt.batch, 1<<20), " "))
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("batches = %q, want %q", got, tt.want)
			}
			if segs, err := q.Take(nil, 1<<20); !errors.Is(err, ErrClosed) || len(segs) != 0 {
				t.Fatalf("Take after the close = %v, %v; want nothing, ErrClosed", labels(segs), err)
			}
			if q.Bytes() != 0 || b.Stats().QueuedBytes != 0 {
				t.Fatalf("after the close: Bytes %d budget %d, want 0", q.Bytes(), b.Stats().QueuedBytes)
			}
		})
	}
}

func closeSeg() *Segment {
	s := NewSegment(4)
	*s.Buf = append(*s.Buf, 0x88, 2, 0x03, 0xe8)
	return s
}

// A later priority close is refused but still pushes the queued one ahead
// of the data, as Expedite does.
func TestPushCloseFirstAfterQueuedClose(t *testing.T) {
	for _, expedite := range []bool{false, true} {
		t.Run(fmt.Sprintf("expedite=%v", expedite), func(t *testing.T) {
			q := NewQueue(bigCfg(Evict), nil, nil)
			defer q.Close()
			mustPush(t, q, msg(1, 32))
			mustPush(t, q, msg(2, 32))
			if !q.PushClose(closeSeg(), false) {
				t.Fatal("PushClose refused")
			}
			if expedite {
				q.Expedite()
			} else {
				s := closeSeg()
				if q.PushClose(s, true) {
					t.Fatal("second PushClose accepted")
				}
				s.Free()
			}
			if q.Bytes() != 0 || q.Messages() != 0 {
				t.Fatalf("data kept: Bytes %d Messages %d", q.Bytes(), q.Messages())
			}
			takeWant(t, q, 64, "close")
		})
	}
}

// Pending tells a writer that found the queue idle whether something
// came meanwhile: true after every kind of push, false once a writer has
// taken everything, and false for good once the queue is closed or its
// close frame taken.
func TestPending(t *testing.T) {
	for _, tt := range []struct {
		name string
		push func(q *Queue) bool
		want string // what the writer takes
	}{
		{"Push", func(q *Queue) bool { return q.Push(msg(1, 16)) == nil }, "d1"},
		{"PushControl", func(q *Queue) bool { return q.PushControl(ctlSeg(1)) == nil }, "c1"},
		{"PushPing", func(q *Queue) bool { return q.PushPing(ctlSeg(1)) }, "c1"},
		{"PushClose", func(q *Queue) bool { return q.PushClose(closeSeg(), false) }, "close"},
		{"PushClose first", func(q *Queue) bool { return q.PushClose(closeSeg(), true) }, "close"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			q := NewQueue(bigCfg(Evict), nil, nil)
			defer q.Close()
			if q.Pending() {
				t.Fatal("Pending on a new queue")
			}
			if !tt.push(q) {
				t.Fatal("push refused")
			}
			if !q.Pending() {
				t.Fatal("not Pending after a push")
			}
			got, err := drain(t, q, 64)
			if strings.Join(got, " ") != tt.want {
				t.Fatalf("writer took %v, want %s", got, tt.want)
			}
			if q.Pending() {
				t.Fatalf("Pending after the writer's burst (which ended on %v)", err)
			}
		})
	}
	t.Run("closed", func(t *testing.T) {
		q := NewQueue(bigCfg(Evict), nil, nil)
		mustPush(t, q, msg(1, 16))
		q.Close()
		if q.Pending() {
			t.Fatal("Pending on a closed queue")
		}
	})
	t.Run("expedite on empty", func(t *testing.T) {
		q := NewQueue(bigCfg(Evict), nil, nil)
		defer q.Close()
		q.Expedite()
		if q.Pending() {
			t.Fatal("Pending after Expedite on an empty queue")
		}
	})
}

// ErrIdle leaves dst as it came, like ErrClosed.
func TestTakeIdleKeepsDst(t *testing.T) {
	q := NewQueue(bigCfg(Evict), nil, nil)
	mark := ctlSeg(7)
	defer mark.Free()
	dst := append(make([]*Segment, 0, 4), mark)
	for _, wantErr := range []error{ErrIdle, ErrClosed} {
		if wantErr == ErrClosed {
			q.Close()
		}
		got, err := q.Take(dst, 1<<20)
		if !errors.Is(err, wantErr) || len(got) != 1 || got[0] != mark {
			t.Fatalf("Take = %v, %v; want dst unchanged and %v", labels(got), err, wantErr)
		}
	}
}

func TestTakeBatching(t *testing.T) {
	tests := []struct {
		name     string
		push     []*Segment
		batch    int
		maxBytes int64
		want     []string // one string per Take
	}{
		{
			name:     "maxBytes",
			push:     []*Segment{msg(1, 100), msg(2, 100), msg(3, 100), msg(4, 100), msg(5, 100)},
			batch:    64,
			maxBytes: 250,
			want:     []string{"d1 d2", "d3 d4", "d5"},
		},
		{
			name:     "maxBytes exact",
			push:     []*Segment{msg(1, 100), msg(2, 100), msg(3, 100)},
			batch:    64,
			maxBytes: 200,
			want:     []string{"d1 d2", "d3"},
		},
		{
			name:     "at least one segment",
			push:     []*Segment{msg(1, 500), msg(2, 100)},
			batch:    64,
			maxBytes: 50,
			want:     []string{"d1", "d2"},
		},
		{
			name:     "cap",
			push:     []*Segment{msg(1, 10), msg(2, 10), msg(3, 10), msg(4, 10), msg(5, 10)},
			batch:    2,
			maxBytes: 1 << 20,
			want:     []string{"d1 d2", "d3 d4", "d5"},
		},
		{
			name:     "zero cap still takes one",
			push:     []*Segment{msg(1, 10), msg(2, 10)},
			batch:    0,
			maxBytes: 1 << 20,
			want:     []string{"d1", "d2"},
		},
		{
			name:     "follow ends the batch",
			push:     []*Segment{msg(1, 10), follow(2, 5000, true, false), dataSeg(3, 10, false, true), msg(4, 10)},
			batch:    64,
			maxBytes: 1 << 20,
			want:     []string{"d1 d2", "d3 d4"},
		},
		{
			name:     "follow first",
			push:     []*Segment{follow(1, 5000, true, true), follow(2, 5000, true, true)},
			batch:    64,
			maxBytes: 1 << 20,
			want:     []string{"d1", "d2"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := NewQueue(bigCfg(Evict), nil, nil)
			defer q.Close()
			for _, s := range tt.push {
				mustPush(t, q, s)
			}
			var got []string
			for range tt.want {
				got = append(got, strings.Join(take(t, q, tt.batch, tt.maxBytes), " "))
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("batches = %q, want %q", got, tt.want)
			}
			if q.Bytes() != 0 || q.Messages() != 0 {
				t.Fatalf("left: Bytes %d Messages %d", q.Bytes(), q.Messages())
			}
		})
	}
}

// follow makes a streamed frame's header segment: 16 bytes in memory and
// n payload bytes to copy from the source.
func follow(id uint64, n int64, start, end bool) *Segment {
	s := dataSeg(id, 16, start, end)
	s.Follow = n
	return s
}

// The close frame never rides in the batch of a streamed frame: the writer
// must copy the stream's payload before it writes the close.
func TestCloseAfterFollow(t *testing.T) {
	q := NewQueue(bigCfg(Evict), nil, nil)
	defer q.Close()
	mustPush(t, q, follow(1, 1000, true, true))
	q.PushClose(closeSeg(), false)
	takeWant(t, q, 64, "d1")
	takeWant(t, q, 64, "close")
}

func TestEvictPolicy(t *testing.T) {
	t.Run("messages", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Evict, MaxMessages: 3, MaxBytes: 1 << 20, LowWater: 0.5}, nil, nil)
		defer q.Close()
		for id := uint64(1); id <= 3; id++ {
			mustPush(t, q, msg(id, 16))
		}
		s := msg(4, 16)
		if err := q.Push(s); !errors.Is(err, ErrOverflow) {
			t.Fatalf("Push at MaxMessages = %v, want ErrOverflow", err)
		}
		s.Free()
		if q.Messages() != 3 {
			t.Fatalf("Messages = %d after a refused push, want 3", q.Messages())
		}
		take(t, q, 1, 1<<20)
		mustPush(t, q, msg(4, 16))
	})
	t.Run("bytes", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Evict, MaxMessages: 100, MaxBytes: 1000, LowWater: 0.5}, nil, nil)
		defer q.Close()
		mustPush(t, q, msg(1, 600))
		s := msg(2, 500)
		if err := q.Push(s); !errors.Is(err, ErrOverflow) {
			t.Fatalf("Push past MaxBytes = %v, want ErrOverflow", err)
		}
		s.Free()
		mustPush(t, q, msg(3, 400)) // exactly MaxBytes
		s = msg(4, 8)
		if err := q.Push(s); !errors.Is(err, ErrOverflow) {
			t.Fatalf("Push at MaxBytes = %v, want ErrOverflow", err)
		}
		s.Free()
		if q.Bytes() != 1000 {
			t.Fatalf("Bytes = %d, want 1000", q.Bytes())
		}
	})
	t.Run("oversized message into an empty queue", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Evict, MaxMessages: 100, MaxBytes: 1000, LowWater: 0.5}, nil, nil)
		defer q.Close()
		mustPush(t, q, msg(1, 5000))
		s := msg(2, 8)
		if err := q.Push(s); !errors.Is(err, ErrOverflow) {
			t.Fatalf("Push behind an oversized message = %v, want ErrOverflow", err)
		}
		s.Free()
	})
}

// The rest of a started message is never refused: it waits for the writer.
func TestContinuationWaitsForWriter(t *testing.T) {
	for _, p := range []Policy{Evict, Drop, Pause} {
		t.Run(p.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := NewBudget(BudgetConfig{})
				q := NewQueue(&Config{Policy: p, MaxMessages: 100, MaxBytes: 1000, LowWater: 0.5, KeepNewest: 1}, b, nil)
				defer q.Close()
				mustPush(t, q, dataSeg(1, 600, true, false))
				done := asyncPush(q, dataSeg(2, 600, false, true))
				synctest.Wait()
				if _, ok := returned(done); ok {
					t.Fatal("continuation past MaxBytes did not wait")
				}
				if paused, _ := q.Paused(); !paused {
					t.Fatal("Paused() = false while the continuation waits")
				}
				takeWant(t, q, 64, "d1")
				if err := <-done; err != nil {
					t.Fatalf("continuation Push = %v", err)
				}
				takeWant(t, q, 64, "d2")
				if b.Stats().Paused != 0 {
					t.Fatalf("Stats().Paused = %d after the wait, want 0", b.Stats().Paused)
				}
			})
		})
	}
}

// A message many times MaxBytes streams through when the writer keeps
// taking, whatever the marks: the message being pushed must not count
// against the room its own continuation waits for.
func TestHugeMessageStreams(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{"evict", Config{Policy: Evict, MaxMessages: 4, MaxBytes: 4096, LowWater: 0.5}},
		{"evict one message", Config{Policy: Evict, MaxMessages: 1, MaxBytes: 4096, LowWater: 0.5}},
		{"evict low water rounds to 0", Config{Policy: Evict, MaxMessages: 4, MaxBytes: 4096, LowWater: 0.1}},
		{"drop one message", Config{Policy: Drop, MaxMessages: 1, MaxBytes: 4096, LowWater: 0.5, KeepNewest: 1}},
		{"pause one message", Config{Policy: Pause, MaxMessages: 1, MaxBytes: 4096, LowWater: 0.5}},
		{"pause", Config{Policy: Pause, MaxMessages: 8, MaxBytes: 4096, LowWater: 0.5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := NewBudget(BudgetConfig{})
				q := NewQueue(&tt.cfg, b, nil)
				defer q.Close()
				const frames, size = 200, 1000
				var ids []uint64 // owned by the writers
				w := newBurstWriter(t, q, 4, 2048, func(segs []*Segment) {
					for _, s := range segs {
						if !s.Close {
							ids = append(ids, idOf(s))
						}
					}
				})
				// Messages many times MaxBytes; under Evict only one, since
				// the next would find the queue at its mark.
				messages := 3
				if tt.cfg.Policy == Evict {
					messages = 1
				}
				var id uint64
				for range messages {
					for i := range frames {
						id++
						if err := w.Push(dataSeg(id, size, i == 0, i == frames-1)); err != nil {
							t.Fatalf("Push frame %d: %v", id, err)
						}
					}
				}
				w.PushClose(closeSeg(), false)
				<-w.done
				w.wait()
				if len(ids) != int(id) {
					t.Fatalf("writer got %d frames, want %d", len(ids), id)
				}
				for i, v := range ids {
					if v != uint64(i+1) {
						t.Fatalf("frame %d is %d: out of order", i+1, v)
					}
				}
			})
		})
	}
}

func TestDropPolicy(t *testing.T) {
	t.Run("newest kept", func(t *testing.T) {
		b := NewBudget(BudgetConfig{})
		q := NewQueue(&Config{Policy: Drop, MaxMessages: 5, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 3}, b, nil)
		defer q.Close()
		for id := uint64(1); id <= 20; id++ {
			mustPush(t, q, msg(id, 16))
			if q.Messages() > 5 {
				t.Fatalf("after push %d: Messages = %d, past MaxMessages", id, q.Messages())
			}
		}
		// Each overflow keeps KeepNewest-1 old messages and adds the new
		// one; pushes below the mark add up to MaxMessages again.
		takeWant(t, q, 64, "d16", "d17", "d18", "d19", "d20")
		if q.Dropped() != 15 || b.Stats().DroppedTotal != 15 {
			t.Fatalf("Dropped = %d, budget DroppedTotal = %d; want 15", q.Dropped(), b.Stats().DroppedTotal)
		}
	})

	t.Run("bytes", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Drop, MaxMessages: 100, MaxBytes: 1000, LowWater: 0.5, KeepNewest: 100}, nil, nil)
		defer q.Close()
		for id := uint64(1); id <= 4; id++ {
			mustPush(t, q, msg(id, 300))
		}
		// 900 + 300 > 1000: the oldest goes, though KeepNewest allows more.
		takeWant(t, q, 64, "d2", "d3", "d4")
		if q.Dropped() != 1 {
			t.Fatalf("Dropped = %d, want 1", q.Dropped())
		}
	})

	t.Run("whole messages", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Drop, MaxMessages: 4, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 2}, nil, nil)
		defer q.Close()
		rng := rand.New(rand.NewPCG(1, 2))
		// One state across every batch: a message the writer stopped
		// inside must go on in the next batch, whatever was dropped since.
		var st wholeState
		takeWhole := func(n int) {
			t.Helper()
			segs, err := q.Take(make([]*Segment, 0, n), 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			ok := checkWhole(t, segs, &st)
			freeAll(segs)
			if !ok {
				t.FailNow()
			}
		}
		var id uint64
		for m := 0; m < 200; m++ {
			n := 1 + rng.IntN(5)
			for i := range n {
				id++
				mustPush(t, q, dataSeg(id, 16, i == 0, i == n-1))
			}
			if m%7 == 6 {
				// Let the writer take a little now and then, sometimes
				// stopping inside a message.
				takeWhole(1 + rng.IntN(3))
			}
		}
		takeWhole(64) // the rest
		if st.inMsg || st.last != id {
			t.Fatalf("the writer ended at frame %d, inside a message: %v; want %d, false", st.last, st.inMsg, id)
		}
		if q.Dropped() == 0 {
			t.Fatal("nothing dropped: the test does not test")
		}
	})

	t.Run("started message is not cut", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Drop, MaxMessages: 2, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 1}, nil, nil)
		defer q.Close()
		mustPush(t, q, dataSeg(1, 16, true, false))
		mustPush(t, q, dataSeg(2, 16, false, false))
		mustPush(t, q, dataSeg(3, 16, false, true))
		takeWant(t, q, 1, "d1")
		mustPush(t, q, msg(4, 16))
		mustPush(t, q, msg(5, 16)) // over MaxMessages: 4 goes, 1's tail stays
		mustPush(t, q, msg(6, 16)) // 5 goes, 1's tail stays
		takeWant(t, q, 64, "d2", "d3", "d6")
		if q.Dropped() != 2 {
			t.Fatalf("Dropped = %d, want 2", q.Dropped())
		}
	})

	t.Run("started message does not take a newest place", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Drop, MaxMessages: 5, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 3}, nil, nil)
		defer q.Close()
		mustPush(t, q, dataSeg(1, 16, true, false))
		mustPush(t, q, dataSeg(2, 16, false, true))
		takeWant(t, q, 1, "d1")
		// d9 overflows: d5 and d6 go, d7 and d8 stay with it.
		for id := uint64(3); id <= 9; id++ {
			mustPush(t, q, msg(id, 16))
		}
		// The rest of the started message, then the newest KeepNewest.
		takeWant(t, q, 64, "d2", "d7", "d8", "d9")
	})

	t.Run("started message too big waits", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			q := NewQueue(&Config{Policy: Drop, MaxMessages: 10, MaxBytes: 1000, LowWater: 0.5, KeepNewest: 1}, nil, nil)
			defer q.Close()
			mustPush(t, q, dataSeg(1, 100, true, false))
			mustPush(t, q, dataSeg(2, 800, false, true))
			takeWant(t, q, 1, "d1")
			// 800 + 300 > 1000 and only the started message is queued:
			// nothing may be dropped, so the producer waits.
			done := asyncPush(q, msg(3, 300))
			synctest.Wait()
			if _, ok := returned(done); ok {
				t.Fatal("Push did not wait for the started message")
			}
			takeWant(t, q, 64, "d2")
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			takeWant(t, q, 64, "d3")
			if q.Dropped() != 0 {
				t.Fatalf("Dropped = %d, want 0", q.Dropped())
			}
		})
	})
}

// wholeState follows the frames a writer takes, across batches.
type wholeState struct {
	inMsg bool
	last  uint64 // id of the last frame
}

// checkWhole checks that segs continue whole messages: ids rise, a message
// starts only after the last one ended, and the frames of one message have
// consecutive ids (none of it was dropped). It reports the first fault
// with t.Errorf, since writer goroutines call it too, and returns false.
func checkWhole(t *testing.T, segs []*Segment, st *wholeState) bool {
	t.Helper()
	for _, s := range segs {
		if s.Control {
			continue
		}
		id := idOf(s)
		if id <= st.last && st.last != 0 {
			t.Errorf("frame %d after %d: out of order", id, st.last)
			return false
		}
		switch {
		case s.Start && st.inMsg:
			t.Errorf("frame %d starts a message inside message ending at %d", id, st.last)
			return false
		case !s.Start && !st.inMsg && st.last != 0:
			t.Errorf("frame %d continues a message that was not started (last %d)", id, st.last)
			return false
		case !s.Start && st.last != 0 && id != st.last+1:
			t.Errorf("frame %d continues a message whose frame %d..%d was dropped", id, st.last+1, id-1)
			return false
		}
		st.inMsg = !s.End
		st.last = id
	}
	return true
}

func TestPausePolicy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := NewBudget(BudgetConfig{})
		q := NewQueue(&Config{Policy: Pause, MaxMessages: 10, MaxBytes: 1 << 20, LowWater: 0.5, SlowAge: time.Second}, b, nil)
		defer q.Close()
		for id := uint64(1); id <= 10; id++ {
			mustPush(t, q, msg(id, 16))
		}
		done := asyncPush(q, msg(11, 16))
		synctest.Wait()
		if _, ok := returned(done); ok {
			t.Fatal("Push past the high-water mark did not block")
		}
		if paused, _ := q.Paused(); !paused {
			t.Fatal("Paused() = false while the producer is blocked")
		}
		if st := b.Stats(); st.Paused != 1 {
			t.Fatalf("Stats().Paused = %d, want 1", st.Paused)
		}
		time.Sleep(3 * time.Second)
		if _, since := q.Paused(); since != 3*time.Second {
			t.Fatalf("Paused() since = %v, want 3s", since)
		}

		var got []string
		// 10 -> 6 messages: still above the low-water mark of 5.
		for range 4 {
			got = append(got, take(t, q, 1, 1<<20)...)
			synctest.Wait()
			if _, ok := returned(done); ok {
				t.Fatalf("producer resumed at %d messages, above the low-water mark", q.Messages())
			}
		}
		got = append(got, take(t, q, 1, 1<<20)...) // 5: at the mark
		synctest.Wait()
		if err, ok := returned(done); !ok || err != nil {
			t.Fatalf("producer at the low-water mark: returned %v, err %v", ok, err)
		}
		if paused, _ := q.Paused(); paused {
			t.Fatal("Paused() = true after the producer resumed")
		}
		st := b.Stats()
		if st.Paused != 0 || st.PausedTime != 3*time.Second {
			t.Fatalf("Stats() Paused %d PausedTime %v, want 0 and 3s", st.Paused, st.PausedTime)
		}
		got = append(got, take(t, q, 64, 1<<20)...)
		var want []string
		for id := 1; id <= 11; id++ {
			want = append(want, fmt.Sprintf("d%d", id))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("writer got %v, want %v", got, want)
		}
	})
}

func TestPauseBytesLowWater(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue(&Config{Policy: Pause, MaxMessages: 100, MaxBytes: 1000, LowWater: 0.5}, nil, nil)
		defer q.Close()
		for id := uint64(1); id <= 5; id++ {
			mustPush(t, q, msg(id, 200))
		}
		done := asyncPush(q, msg(6, 200))
		synctest.Wait()
		take(t, q, 2, 1<<20) // 600 bytes left: above 500
		synctest.Wait()
		if _, ok := returned(done); ok {
			t.Fatal("producer resumed above the low-water mark in bytes")
		}
		take(t, q, 1, 1<<20) // 400
		synctest.Wait()
		if err, ok := returned(done); !ok || err != nil {
			t.Fatalf("producer below the low-water mark: returned %v, err %v", ok, err)
		}
	})
}

func TestPauseMax(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := NewBudget(BudgetConfig{})
		q := NewQueue(&Config{Policy: Pause, MaxMessages: 1, MaxBytes: 1 << 20, LowWater: 0.5, PauseMax: 5 * time.Second}, b, nil)
		defer q.Close()
		mustPush(t, q, msg(1, 16))
		start := time.Now()
		s := msg(2, 16)
		done := asyncPush(q, s)
		synctest.Wait()
		if b.Stats().Paused != 1 {
			t.Fatalf("Stats().Paused = %d, want 1", b.Stats().Paused)
		}
		if err := <-done; !errors.Is(err, ErrPauseTimeout) {
			t.Fatalf("Push = %v, want ErrPauseTimeout", err)
		}
		s.Free()
		if d := time.Since(start); d != 5*time.Second {
			t.Fatalf("pause ended after %v, want 5s", d)
		}
		if st := b.Stats(); st.Paused != 0 || st.PausedTime != 5*time.Second {
			t.Fatalf("Stats() Paused %d PausedTime %v, want 0 and 5s", st.Paused, st.PausedTime)
		}
		if paused, _ := q.Paused(); paused {
			t.Fatal("Paused() = true after the timeout")
		}
		// The queue still works: a push after the writer drains succeeds.
		take(t, q, 64, 1<<20)
		mustPush(t, q, msg(3, 16))
	})
}

func TestCloseUnblocksProducer(t *testing.T) {
	for _, how := range []string{"Close", "PushClose", "PushClose first"} {
		t.Run(how, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := NewBudget(BudgetConfig{})
				q := NewQueue(&Config{Policy: Pause, MaxMessages: 1, MaxBytes: 1 << 20, LowWater: 0.5}, b, nil)
				defer q.Close()
				mustPush(t, q, msg(1, 16))
				s := msg(2, 16)
				done := asyncPush(q, s)
				synctest.Wait()
				switch how {
				case "Close":
					q.Close()
				case "PushClose":
					q.PushClose(closeSeg(), false)
				default:
					q.PushClose(closeSeg(), true)
				}
				if err := <-done; !errors.Is(err, ErrClosed) {
					t.Fatalf("paused Push = %v, want ErrClosed", err)
				}
				s.Free()
				if b.Stats().Paused != 0 {
					t.Fatalf("Stats().Paused = %d, want 0", b.Stats().Paused)
				}
			})
		})
	}
}

func TestStreamDiscard(t *testing.T) {
	tests := []struct {
		name    string
		discard func(q *Queue)
		want    bool // ErrClosed expected on the channel
	}{
		{"Close", func(q *Queue) { q.Close() }, true},
		{"Expedite", func(q *Queue) { q.Expedite() }, true},
		{"PushClose first", func(q *Queue) { q.PushClose(closeSeg(), true) }, true},
		{"PushClose after data", func(q *Queue) { q.PushClose(closeSeg(), false) }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := NewQueue(bigCfg(Evict), nil, nil)
			defer q.Close()
			ch := make(chan error, 1)
			mustPush(t, q, msg(1, 16))
			f := follow(2, 1000, true, true)
			f.Discarded = ch
			mustPush(t, q, f)
			tt.discard(q)
			select {
			case err := <-ch:
				if !tt.want || !errors.Is(err, ErrClosed) {
					t.Fatalf("channel got %v, want nothing=%v", err, !tt.want)
				}
			default:
				if tt.want {
					t.Fatal("nothing on the channel for a discarded stream")
				}
			}
		})
	}

	t.Run("dropped", func(t *testing.T) {
		q := NewQueue(&Config{Policy: Drop, MaxMessages: 2, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 1}, nil, nil)
		defer q.Close()
		ch := make(chan error, 1)
		f := follow(1, 1000, true, true)
		f.Discarded = ch
		mustPush(t, q, f)
		mustPush(t, q, msg(2, 16))
		mustPush(t, q, msg(3, 16)) // drops 1 and 2
		select {
		case err := <-ch:
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("channel got %v, want ErrClosed", err)
			}
		default:
			t.Fatal("nothing on the channel for a dropped stream")
		}
	})

	t.Run("taken", func(t *testing.T) {
		// A streamed segment the writer took is the writer's to report.
		q := NewQueue(bigCfg(Evict), nil, nil)
		ch := make(chan error, 1)
		f := follow(1, 1000, true, true)
		f.Discarded = ch
		mustPush(t, q, f)
		take(t, q, 64, 1<<20)
		q.Close()
		if len(ch) != 0 {
			t.Fatalf("channel got %v for a stream the writer took", <-ch)
		}
	})
}

func TestCloseIdempotent(t *testing.T) {
	b := NewBudget(BudgetConfig{})
	cfg := bigCfg(Evict)
	cfg.SlowAge = time.Second
	q := NewQueue(cfg, b, nil)
	mustPush(t, q, msg(1, 100))
	q.PushControl(ctlSeg(1))
	q.PushClose(closeSeg(), false)
	q.Close()
	q.Close()
	if st := b.Stats(); st.QueuedBytes != 0 || st.Slow != 0 || st.Connections != 0 {
		t.Fatalf("after Close: %+v", st)
	}
	if segs, err := q.Take(nil, 1<<20); !errors.Is(err, ErrClosed) || len(segs) != 0 {
		t.Fatalf("Take after Close = %v, %v", labels(segs), err)
	}
	s := msg(2, 16)
	if err := q.Push(s); !errors.Is(err, ErrClosed) {
		t.Fatalf("Push after Close = %v", err)
	}
	s.Free()
	c := ctlSeg(1)
	if q.PushControl(c) == nil {
		t.Fatal("PushControl after Close accepted")
	}
	c.Free()
	c = closeSeg()
	if q.PushClose(c, true) {
		t.Fatal("PushClose after Close accepted")
	}
	c.Free()
}

func TestObserveWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var waits []time.Duration
		b := NewBudget(BudgetConfig{ObserveWait: func(d time.Duration) { waits = append(waits, d) }})
		q := NewQueue(bigCfg(Evict), b, nil)
		defer q.Close()
		mustPush(t, q, msg(1, 16))
		time.Sleep(time.Second)
		mustPush(t, q, dataSeg(2, 16, true, false))
		time.Sleep(time.Second)
		mustPush(t, q, dataSeg(3, 16, false, true))
		take(t, q, 64, 1<<20)
		// One observation per batch, for the newest message it started.
		if !slices.Equal(waits, []time.Duration{time.Second}) {
			t.Fatalf("waits = %v, want [1s]", waits)
		}
		q.PushControl(ctlSeg(1))
		take(t, q, 64, 1<<20)
		if len(waits) != 1 {
			t.Fatalf("a control-only batch was observed: %v", waits)
		}
	})
}

func TestPolicyNames(t *testing.T) {
	for _, p := range []Policy{Evict, Drop, Pause} {
		got, err := ParsePolicy(p.String())
		if err != nil || got != p {
			t.Fatalf("ParsePolicy(%q) = %v, %v", p.String(), got, err)
		}
	}
	if _, err := ParsePolicy("block"); err == nil {
		t.Fatal("ParsePolicy(block) succeeded")
	}
	if s := Policy(7).String(); s != "Policy(7)" {
		t.Fatalf("Policy(7).String() = %q", s)
	}
}

// One producer, its writers and one goroutine sending control frames, as a
// session runs them: every data frame arrives once, in order, in whole
// messages; every accepted control frame arrives before the close; one
// writer runs at a time, started on demand.
func TestConcurrentPushTake(t *testing.T) {
	const total = 100_000
	tests := []struct {
		name     string
		cfg      Config
		lossless bool
	}{
		{"pause", Config{Policy: Pause, MaxMessages: 16, MaxBytes: 8 << 10, LowWater: 0.5, SlowAge: time.Second}, true},
		{"drop", Config{Policy: Drop, MaxMessages: 16, MaxBytes: 8 << 10, LowWater: 0.5, KeepNewest: 4, SlowAge: time.Second}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewBudget(BudgetConfig{})
			q := NewQueue(&tt.cfg, b, nil)

			// Owned by the writers, read once they have all ended.
			var (
				st       wholeState
				frames   int
				ctlGot   int
				sawClose bool
			)
			w := newBurstWriter(t, q, 16, 4096, func(segs []*Segment) {
				for _, s := range segs {
					switch {
					case s.Close:
						sawClose = true
					case s.Control:
						ctlGot++
					default:
						frames++
						if id := idOf(s); tt.lossless && id != uint64(frames) {
							t.Errorf("frame %d arrived as number %d", id, frames)
						}
					}
				}
				checkWhole(t, segs, &st)
				if t.Failed() {
					q.Close() // stops the writers and the producer
				}
			})

			stop := make(chan struct{})
			var wg sync.WaitGroup
			var ctlSent int
			wg.Go(func() { // control frames
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					s := ctlSeg(byte(i))
					if w.PushControl(s) == nil {
						ctlSent++
					} else {
						s.Free()
						runtime.Gosched()
					}
				}
			})
			var pushErr error
			produced := make(chan struct{})
			wg.Go(func() { // producer
				defer close(produced)
				rng := rand.New(rand.NewPCG(3, 4))
				for id := uint64(1); id <= total; {
					n := min(1+rng.IntN(4), total-int(id)+1)
					for i := range n {
						s := dataSeg(id, 8+rng.IntN(600), i == 0, i == n-1)
						if err := w.Push(s); err != nil {
							s.Free()
							pushErr = fmt.Errorf("Push %d: %w", id, err)
							q.Close()
							return
						}
						id++
					}
				}
				w.PushClose(closeSeg(), false)
			})

			<-produced
			if pushErr == nil {
				<-w.done // the close frame is queued, or a failed writer closed the queue
			}
			q.Close()
			close(stop)
			wg.Wait()
			w.wait()
			if pushErr != nil {
				t.Fatal(pushErr)
			}
			if !sawClose {
				t.Fatal("no close frame")
			}
			if tt.lossless && frames != total {
				t.Fatalf("writer got %d frames, want %d", frames, total)
			}
			if st.last != total {
				t.Fatalf("last frame %d, want %d", st.last, total)
			}
			if ctlGot != ctlSent {
				t.Fatalf("writer got %d control frames, %d were accepted", ctlGot, ctlSent)
			}
			if s := b.Stats(); s.QueuedBytes != 0 || s.Slow != 0 || s.Paused != 0 || s.Connections != 0 {
				t.Fatalf("budget after the run: %+v", s)
			}
			t.Logf("%d frames, %d control frames, %d messages dropped, %d writer bursts",
				frames, ctlGot, q.Dropped(), w.starts.Load())
		})
	}
}

// pushTakeCase is a queue configuration that the benchmarks share with
// the allocation tests.
type pushTakeCase struct {
	name   string
	cfg    Config
	budget bool
}

// newQueue makes the case's queue, counted in a Budget of its own when
// the case has one.
func (bc *pushTakeCase) newQueue() *Queue {
	var bud *Budget
	if bc.budget {
		bud = NewBudget(BudgetConfig{Ceiling: 1 << 30, SlowRatio: 0.1})
	}
	return NewQueue(&bc.cfg, bud, func(Reason) {})
}

// wholeMsg makes a single-frame message of payload, as a reader would.
func wholeMsg(payload []byte) *Segment {
	s := NewSegment(len(payload))
	*s.Buf = append(*s.Buf, payload...)
	s.Start, s.End = true, true
	return s
}

// pushTakeCases are shared by the benchmarks.
var pushTakeCases = []pushTakeCase{
	{"evict", Config{Policy: Evict, MaxMessages: 100, MaxBytes: 1 << 20, LowWater: 0.5}, false},
	{"evict/budget", Config{Policy: Evict, MaxMessages: 100, MaxBytes: 1 << 20, LowWater: 0.5, SlowAge: time.Second}, true},
	{"drop/budget", Config{Policy: Drop, MaxMessages: 100, MaxBytes: 1 << 20, LowWater: 0.5, KeepNewest: 10, SlowAge: time.Second}, true},
	{"pause", Config{Policy: Pause, MaxMessages: 100, MaxBytes: 1 << 20, LowWater: 0.5}, false},
	{"pause/budget", Config{Policy: Pause, MaxMessages: 100, MaxBytes: 1 << 20, LowWater: 0.5, SlowAge: time.Second}, true},
}

// The queue adds no allocation to a push and a take: the same segment
// goes round, so no pool is involved.
func TestPushTakeAllocs(t *testing.T) {
	for _, bc := range pushTakeCases {
		t.Run(bc.name, func(t *testing.T) {
			q := bc.newQueue()
			defer q.Close()
			s := msg(1, 64)
			defer s.Free()
			batch := make([]*Segment, 0, 8)
			allocs := testing.AllocsPerRun(1000, func() {
				if err := q.Push(s); err != nil {
					t.Fatal(err)
				}
				if _, err := q.Take(batch[:0], 1<<20); err != nil {
					t.Fatal(err)
				}
			})
			if allocs != 0 {
				t.Fatalf("Push+Take allocates %v per run, want 0", allocs)
			}
		})
	}
}

// Nor does a burst: a push, its Take, and the Take that finds the queue
// idle and the look that finds nothing pending.
func TestBurstAllocs(t *testing.T) {
	for _, bc := range pushTakeCases {
		t.Run(bc.name, func(t *testing.T) {
			q := bc.newQueue()
			defer q.Close()
			s := msg(1, 64)
			defer s.Free()
			batch := make([]*Segment, 0, 8)
			const runs = 1000
			allocs := testing.AllocsPerRun(runs, func() {
				if err := q.Push(s); err != nil {
					t.Fatal(err)
				}
				if _, err := q.Take(batch[:0], 1<<20); err != nil {
					t.Fatal(err)
				}
				if _, err := q.Take(batch[:0], 1<<20); !errors.Is(err, ErrIdle) {
					t.Fatalf("Take on an emptied queue = %v, want ErrIdle", err)
				}
				if q.Pending() {
					t.Fatal("Pending on an emptied queue")
				}
			})
			if allocs != 0 {
				t.Fatalf("a burst allocates %v per run, want 0", allocs)
			}
		})
	}
}

// BenchmarkPushTake is the steady state of one connection: push one
// segment, take one batch, free it.
func BenchmarkPushTake(b *testing.B) {
	for _, bc := range pushTakeCases {
		b.Run(bc.name, func(b *testing.B) {
			q := bc.newQueue()
			defer q.Close()
			batch := make([]*Segment, 0, 64)
			payload := make([]byte, 512)
			b.ReportAllocs()
			b.SetBytes(int64(len(payload)))
			for b.Loop() {
				if err := q.Push(wholeMsg(payload)); err != nil {
					b.Fatal(err)
				}
				segs, err := q.Take(batch[:0], 1<<20)
				if err != nil {
					b.Fatal(err)
				}
				freeAll(segs)
			}
		})
	}
}

// BenchmarkBurst is one burst of an otherwise idle connection: push one
// segment, take it, and find the queue idle with nothing pending.
func BenchmarkBurst(b *testing.B) {
	for _, bc := range pushTakeCases {
		b.Run(bc.name, func(b *testing.B) {
			q := bc.newQueue()
			defer q.Close()
			batch := make([]*Segment, 0, 64)
			payload := make([]byte, 512)
			b.ReportAllocs()
			b.SetBytes(int64(len(payload)))
			for b.Loop() {
				if err := q.Push(wholeMsg(payload)); err != nil {
					b.Fatal(err)
				}
				segs, err := q.Take(batch[:0], 1<<20)
				if err != nil {
					b.Fatal(err)
				}
				freeAll(segs)
				if _, err := q.Take(batch[:0], 1<<20); !errors.Is(err, ErrIdle) || q.Pending() {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPushTakeParallel runs the producer on its own goroutine and the
// writers as a session does, one goroutine per burst started by the push
// that finds none running.
func BenchmarkPushTakeParallel(b *testing.B) {
	for _, bc := range pushTakeCases {
		if bc.cfg.Policy != Pause {
			continue // no segment may be refused
		}
		b.Run(bc.name, func(b *testing.B) {
			q := bc.newQueue()
			w := newBurstWriter(b, q, 64, 64<<10, nil)
			payload := make([]byte, 512)
			b.ReportAllocs()
			b.SetBytes(int64(len(payload)))
			n := 0
			for b.Loop() {
				if err := w.Push(wholeMsg(payload)); err != nil {
					b.Fatal(err)
				}
				n++
			}
			w.PushClose(closeSeg(), false)
			<-w.done
			q.Close()
			w.wait()
			b.ReportMetric(float64(w.starts.Load())/float64(n), "bursts/op")
		})
	}
}

// Under Evict, a message that finds the queue full waits EvictGrace for
// the writer to drain it to low water; only a writer that does not is a
// slow client.
func TestEvictGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := &Config{Policy: Evict, MaxMessages: 4, MaxBytes: 1 << 20, LowWater: 0.5, EvictGrace: 20 * time.Millisecond}
		q := NewQueue(cfg, nil, nil)
		defer q.Close()
		fillMessages(t, q, 4)
		late := make(chan error, 1)
		go func() { late <- q.Push(msg(5, 16)) }()
		synctest.Wait()
		select {
		case err := <-late:
			t.Fatalf("Push on a full queue returned %v at once, want it to wait the grace", err)
		default:
		}
		time.Sleep(10 * time.Millisecond) // the writer comes late, within the grace
		take(t, q, 3, 1<<20)
		if err := <-late; err != nil {
			t.Fatalf("Push after the writer caught up = %v, want nil", err)
		}

		fillMessages(t, q, 2) // full again: 2 left + 2
		began := time.Now()
		s := msg(9, 16)
		if err := q.Push(s); !errors.Is(err, ErrOverflow) {
			t.Fatalf("Push on a queue nobody drains = %v, want ErrOverflow", err)
		}
		s.Free()
		if d := time.Since(began); d != 20*time.Millisecond {
			t.Fatalf("refused after %v, want the 20ms grace", d)
		}
	})
}

// Under Evict with progress sampled (SlowAge set), a full queue evicts only
// a client that has taken nothing for EvictGrace: one that takes, however
// slowly the machine lets it, holds the producer back instead.
func TestEvictOnlyTheStalled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := NewBudget(BudgetConfig{})
		cfg := &Config{Policy: Evict, MaxMessages: 4, MaxBytes: 1 << 20, LowWater: 0.5,
			EvictGrace: 10 * GuardInterval, SlowAge: time.Hour}
		q := NewQueue(cfg, b, nil)
		defer q.Close()
		clock := newGuardClock(b)
		mustPush(t, q, msg(0, 16))
		take(t, q, 1, 1<<20) // on the guard's list from now on
		fillMessages(t, q, 4)

		// A client that takes one message every 9 ticks: each push waits,
		// then goes on; none is refused.
		for i := range 30 {
			done := asyncPush(q, msg(uint64(100+i), 16))
			synctest.Wait()
			if _, ok := returned(done); ok {
				t.Fatalf("push %d past the mark did not wait", i)
			}
			if st := b.Stats(); st.Paused != 1 {
				t.Fatalf("push %d: Paused = %d while it waits, want 1", i, st.Paused)
			}
			clock.run(8 * GuardInterval)
			synctest.Wait()
			if err, ok := returned(done); ok {
				t.Fatalf("push %d returned %v before the client took anything", i, err)
			}
			take(t, q, 1, 1<<20)
			clock.run(GuardInterval)
			synctest.Wait()
			err, ok := returned(done)
			if !ok || err != nil {
				t.Fatalf("push %d after the client took a message: returned %v, %v; want nil", i, ok, err)
			}
		}

		// The client stops taking: the next push past the mark is refused
		// once EvictGrace has passed without progress, not before.
		done := asyncPush(q, msg(999, 16))
		clock.run(9 * GuardInterval)
		synctest.Wait()
		if err, ok := returned(done); ok {
			t.Fatalf("refused after 9 still ticks (%v), want the grace of 10", err)
		}
		clock.run(GuardInterval)
		synctest.Wait()
		if err, ok := returned(done); !ok || !errors.Is(err, ErrOverflow) {
			t.Fatalf("after 10 still ticks: returned %v, %v; want ErrOverflow", ok, err)
		}
		if st := b.Stats(); st.Paused != 0 {
			t.Fatalf("Paused = %d after the refusal, want 0", st.Paused)
		}
	})
}

// A client already stalled when its queue fills is refused at once: the
// backend is not held back for it.
func TestEvictStalledAtOnce(t *testing.T) {
	b := NewBudget(BudgetConfig{})
	cfg := &Config{Policy: Evict, MaxMessages: 4, MaxBytes: 1 << 20, LowWater: 0.5,
		EvictGrace: 10 * GuardInterval, SlowAge: time.Hour}
	q := NewQueue(cfg, b, nil)
	defer q.Close()
	clock := newGuardClock(b)
	mustPush(t, q, msg(0, 16))
	take(t, q, 1, 1<<20)
	// Messages arrive slowly; the client took its last one long ago.
	clock.run(20*GuardInterval, func() {
		if q.Messages() < 4 {
			fillMessages(t, q, 1)
		}
	})
	s := msg(5, 16)
	if err := q.Push(s); !errors.Is(err, ErrOverflow) {
		t.Fatalf("Push on a full queue of a client stalled for 20 ticks = %v, want ErrOverflow at once", err)
	}
	s.Free()
}

// Under Evict, a client that takes bytes but never enough to bring its
// queue down holds the producer back at most PauseMax: then the session
// ends (ErrPauseTimeout), as under Pause.
func TestEvictWaitBoundedByPauseMax(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := NewBudget(BudgetConfig{})
		cfg := &Config{Policy: Evict, MaxMessages: 4, MaxBytes: 1 << 20, LowWater: 0.5,
			EvictGrace: 10 * GuardInterval, SlowAge: time.Hour, PauseMax: 3 * time.Second}
		q := NewQueue(cfg, b, nil)
		defer q.Close()
		mustPush(t, q, msg(0, 16))
		take(t, q, 1, 1<<20)
		fillMessages(t, q, 4)
		done := asyncPush(q, msg(5, 16))
		// The guard sees progress every tick (the client acknowledges a
		// byte), yet the queue stays full.
		var acked atomic.Int64
		q.OnUnsent(func() int64 { return 1<<20 - acked.Add(1) })
		for range int(3*time.Second/GuardInterval) - 1 {
			time.Sleep(GuardInterval)
			b.SampleUnsent(nil)
			synctest.Wait()
			if err, ok := returned(done); ok {
				t.Fatalf("returned %v before PauseMax while the client took bytes", err)
			}
		}
		time.Sleep(2 * GuardInterval)
		synctest.Wait()
		if err, ok := returned(done); !ok || !errors.Is(err, ErrPauseTimeout) {
			t.Fatalf("after PauseMax: returned %v, %v; want ErrPauseTimeout", ok, err)
		}
	})
}

// PausedWithin is true while the producer waits for room, and for d after:
// a pong held behind the backlog needs that long once reading resumes.
func TestPausedWithin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue(&Config{Policy: Pause, MaxMessages: 1, MaxBytes: 1 << 20, LowWater: 0.5}, nil, nil)
		defer q.Close()
		if q.PausedWithin(time.Second) {
			t.Fatal("PausedWithin before any pause")
		}
		mustPush(t, q, msg(1, 16))
		done := asyncPush(q, msg(2, 16))
		synctest.Wait()
		if !q.PausedWithin(time.Second) {
			t.Fatal("not PausedWithin while the producer waits")
		}
		take(t, q, 1, 1<<20)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		time.Sleep(999 * time.Millisecond)
		if !q.PausedWithin(time.Second) {
			t.Fatal("not PausedWithin 999ms after the pause ended")
		}
		time.Sleep(time.Millisecond)
		if q.PausedWithin(time.Second) {
			t.Fatal("PausedWithin a second after the pause ended")
		}
	})
}
