package frame

import (
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// BenchmarkChecker replays the passing Checker test cases; one op is one
// header.
func BenchmarkChecker(b *testing.B) {
	for _, tc := range checkCases {
		if tc.want != nil {
			continue
		}
		frames := make([]ws.Header, len(tc.frames))
		for i, h := range tc.frames {
			h.Masked, h.Mask = true, [4]byte{1, 2, 3, 4}
			frames[i] = h
		}
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			var c Checker
			for i := 0; b.Loop(); i++ {
				k := i % len(frames)
				if k == 0 {
					c = Checker{FromClient: true, Extension: tc.ext, MaxFrame: tc.maxFrame, MaxMessage: tc.maxMessage}
				}
				if err := c.Check(frames[k]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// loopConn is an in-memory net.Conn that serves the same stream forever.
type loopConn struct {
	streamConn
	stream []byte
	pos    int
}

func (c *loopConn) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		k := copy(p[n:], c.stream[c.pos:])
		n += k
		c.pos = (c.pos + k) % len(c.stream)
	}
	return n, nil
}

// readHeaderCases are the streams BenchmarkReadHeader reads in a loop; every
// frame is final, so the stream can repeat.
var readHeaderCases = []struct {
	name   string
	frames []testFrame
}{
	{"empty frames", []testFrame{makeFrame(ws.OpBinary, true, true, 0, 1)}},
	{"16B frames", []testFrame{makeFrame(ws.OpText, true, true, 16, 1)}},
	{"1KiB frames", []testFrame{makeFrame(ws.OpBinary, true, true, 1000, 1)}},
	{"20KiB frames", []testFrame{makeFrame(ws.OpBinary, true, true, 20000, 1)}},
	{"mixed", manySmallFrames(300)},
}

// BenchmarkReadHeader measures the receive path of a proxy per frame: read
// the header, check it, skip the payload. It must not allocate.
func BenchmarkReadHeader(b *testing.B) {
	for _, tc := range readHeaderCases {
		stream := wireOf(tc.frames...)
		b.Run("memory/"+tc.name, func(b *testing.B) {
			benchReadHeader(b, &loopConn{stream: stream}, len(stream)/len(tc.frames))
		})
		b.Run("tcp/"+tc.name, func(b *testing.B) {
			w, c := tcpPair(b)
			// Write in batches of 64 KiB or more, so that the benchmark
			// measures the reader rather than one syscall per frame.
			batch := stream
			for len(batch) < 64<<10 {
				batch = append(batch, stream...)
			}
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { // streamWriter: keeps the socket full until closed
				defer wg.Done()
				for {
					if _, err := w.Write(batch); err != nil {
						return
					}
				}
			}()
			defer wg.Wait()
			defer w.Close()
			c.SetReadDeadline(time.Now().Add(time.Minute))
			benchReadHeader(b, c, len(stream)/len(tc.frames))
		})
	}
}

func benchReadHeader(b *testing.B, conn net.Conn, frameBytes int) {
	r := NewReader(conn, nil)
	defer r.Release()
	c := &Checker{FromClient: true, MaxFrame: 1 << 20, MaxMessage: 1 << 20}
	b.SetBytes(int64(frameBytes))
	b.ReportAllocs()
	for b.Loop() {
		h, _, err := r.ReadHeader()
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Check(h); err != nil {
			b.Fatal(err)
		}
		if err := r.Discard(h.Length); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendClose(b *testing.B) {
	reasons := map[string]string{
		"no reason":   "",
		"short":       "going away",
		"cut at rune": strings.Repeat("é", 100),
	}
	for name, reason := range reasons {
		for _, masked := range []bool{false, true} {
			b.Run(name+"/masked="+strconv.FormatBool(masked), func(b *testing.B) {
				b.ReportAllocs()
				dst := make([]byte, 0, MaxControlFrame)
				for b.Loop() {
					dst = AppendClose(dst[:0], ws.StatusGoingAway, reason, masked)
				}
			})
		}
	}
}

func BenchmarkGetPutBuffer(b *testing.B) {
	for _, size := range sizeClasses {
		b.Run(strconv.Itoa(size), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p := GetBuffer(size)
				*p = append(*p, 1)
				PutBuffer(p)
			}
		})
	}
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				PutBuffer(GetBuffer(readBufferSize))
			}
		})
	})
}

// TestReadPathAllocs pins the result BenchmarkReadHeader reports: the steady
// read-check path allocates nothing, whichever way payloads fall against the
// buffer.
func TestReadPathAllocs(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("allocation counts")
	}
	payload := make([]byte, 1<<20)
	for _, tc := range readHeaderCases {
		for _, discard := range []bool{false, true} {
			name := tc.name + "/ReadFull"
			if discard {
				name = tc.name + "/Discard"
			}
			t.Run(name, func(t *testing.T) {
				r := NewReader(&loopConn{stream: wireOf(tc.frames...)}, nil)
				defer r.Release()
				c := &Checker{FromClient: true, MaxFrame: 1 << 20}
				step := func() {
					h, _, err := r.ReadHeader()
					if err == nil {
						err = c.Check(h)
					}
					if err == nil && discard {
						err = r.Discard(h.Length)
					} else if err == nil {
						err = r.ReadFull(payload[:h.Length])
					}
					if err != nil {
						t.Fatal(err)
					}
				}
				// One run of many frames: AllocsPerRun divides with
				// integers, so this counts every allocation, however rare.
				n := testing.AllocsPerRun(1, func() {
					for range 10000 {
						step()
					}
				})
				// Discard goes through io.Discard's ReadFrom, whose
				// internal sync.Pool allocates now and then when the
				// goroutine changes P between Put and Get.
				limit := 0.0
				if discard {
					limit = 10
				}
				if n > limit {
					t.Fatalf("%v allocations in 10000 frames", n)
				}
			})
		}
	}
}
