package limiter

import (
	"sync"

	"github.com/sluice-proxy/sluice/frame"
)

// Segment is one unit of bytes to write to a socket: a whole frame, or the
// header of a streamed frame whose payload the writer copies from the source
// connection afterwards (Follow bytes).
type Segment struct {
	// Buf holds the bytes to write, from the frame pool. Owned by whoever
	// holds the Segment; Free returns it.
	Buf *[]byte
	// Follow is the number of payload bytes that come straight from the
	// source connection after Buf (splice). Such a segment ends a batch.
	Follow int64
	// Discarded, for a Follow segment, hears ErrClosed if the segment is
	// freed unwritten, so that the producer waiting for its payload to be
	// copied skips it instead. Set by the producer.
	Discarded chan<- error
	// Start and End mark the first and last frame of a data message.
	Start, End bool
	// Control marks a control frame (from PushControl or PushClose); Close
	// marks a close frame, after which nothing may be written.
	Control, Close bool

	queuedAt int64 // monotonic nanoseconds at Push of a Start segment, for the wait histogram; 0 when nobody observes
	next     *Segment
}

var segmentPool = sync.Pool{New: func() any { return new(Segment) }}

// NewSegment returns an empty segment whose Buf can hold n bytes.
func NewSegment(n int) *Segment {
	s := segmentPool.Get().(*Segment)
	s.Buf = frame.GetBuffer(n)
	return s
}

// Len is the number of bytes the segment holds in memory.
func (s *Segment) Len() int64 { return int64(len(*s.Buf)) }

// Bytes is what to write before any Follow bytes.
func (s *Segment) Bytes() []byte { return *s.Buf }

// Free returns the segment and its buffer to their pools.
func (s *Segment) Free() {
	if s.Buf != nil {
		frame.PutBuffer(s.Buf)
	}
	*s = Segment{}
	segmentPool.Put(s)
}
