package wstest

import (
	"bytes"
	"strings"
	"sync"
)

// LogBuffer is a log sink that the goroutines under test write to and the
// test reads, safely.
type LogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Count is the number of lines that contain every one of substrs.
func (l *LogBuffer) Count(substrs ...string) int {
	n := 0
	for line := range strings.SplitSeq(l.String(), "\n") {
		all := line != ""
		for _, sub := range substrs {
			all = all && strings.Contains(line, sub)
		}
		if all {
			n++
		}
	}
	return n
}
