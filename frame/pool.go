package frame

import "sync"

// Buffer size classes, smallest first. A frame that needs more than the
// largest class is streamed, never buffered whole.
var sizeClasses = [...]int{512, 2048, 8192, 32 << 10, 128 << 10}

// MaxPooled is the largest buffer the pool hands out.
const MaxPooled = 128 << 10

var pools [len(sizeClasses)]sync.Pool

// GetBuffer returns a pooled buffer of length 0 and capacity at least n
// (n <= MaxPooled). Hand it back with PutBuffer when its bytes are written.
// The pointer avoids an allocation on every Put.
func GetBuffer(n int) *[]byte {
	for i, size := range sizeClasses {
		if n <= size {
			if b, ok := pools[i].Get().(*[]byte); ok {
				return b
			}
			b := make([]byte, 0, size)
			return &b
		}
	}
	panic("frame: buffer larger than MaxPooled requested")
}

// PutBuffer returns b to its pool. b must not be used afterwards.
func PutBuffer(b *[]byte) {
	c := cap(*b)
	for i, size := range sizeClasses {
		if c == size {
			*b = (*b)[:0]
			pools[i].Put(b)
			return
		}
	}
}
