package demo

import (
	"cmp"
	"fmt"
	"strings"
	"syscall"
	"time"
)

// --- small helpers ---

type sockopt struct{ level, name, value int }

// setSockopts sets socket options before connect or listen.
func setSockopts(c syscall.RawConn, opts ...sockopt) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		for _, o := range opts {
			if e := syscall.SetsockoptInt(int(fd), o.level, o.name, o.value); e != nil && serr == nil {
				serr = fmt.Errorf("setsockopt %d/%d: %w", o.level, o.name, e)
			}
		}
	})
	return cmp.Or(err, serr)
}

// humanBytes renders n in binary units: "0 B", "812 B", "12.3 KiB".
func humanBytes(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	f, units := float64(n), []string{"KiB", "MiB", "GiB", "TiB"}
	i := -1
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	switch {
	case f < 10:
		return fmt.Sprintf("%.2f %s", f, units[i])
	case f < 100:
		return fmt.Sprintf("%.1f %s", f, units[i])
	}
	return fmt.Sprintf("%.0f %s", f, units[i])
}

// compactBytes is humanBytes without the space, for one-line output.
func compactBytes(n int64) string { return strings.ReplaceAll(humanBytes(n), " ", "") }

// ms renders a duration in milliseconds with a sensible precision.
func ms(d time.Duration) string {
	m := float64(d) / float64(time.Millisecond)
	switch {
	case d == 0:
		return "0 ms"
	case m < 10:
		return fmt.Sprintf("%.2f ms", m)
	case m < 1000:
		return fmt.Sprintf("%.0f ms", m)
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

// thousands renders n with comma separators: 1234567 is "1,234,567".
func thousands(n uint64) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// wrap breaks text into lines of at most width columns.
func wrap(text string, width int) string {
	var b strings.Builder
	col := 0
	for _, w := range strings.Fields(text) {
		if col > 0 && col+1+len(w) > width {
			b.WriteByte('\n')
			col = 0
		} else if col > 0 {
			b.WriteByte(' ')
			col++
		}
		b.WriteString(w)
		col += len(w)
	}
	return b.String()
}
