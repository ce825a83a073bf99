package frontdoor

import (
	"strings"
	"testing"
)

func TestLogURL(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"ws://h:8080/socket", "ws://h:8080/socket"},
		{"ws://h/socket?token=abc&room=1", "ws://h/socket?token=REDACTED&room=REDACTED"},
		{"ws://h/?token=", "ws://h/?token=REDACTED"},
		{"ws://h/?eyJhbGciOiJIUzI1NiJ9", "ws://h/?REDACTED"},
		{"ws://h/?a=1&&b=x=y", "ws://h/?a=REDACTED&&b=REDACTED"},
		{"ws://h?token=abc", "ws://h?token=REDACTED"},
		{"ws://user:secret@h/p?token=abc", "ws://user:xxxxx@h/p?token=REDACTED"},
		{"ws://user@h/p", "ws://user@h/p"},
		{"ws://user:pw@h/p", "ws://user:xxxxx@h/p"},
		{"ws://h/p?k=v#frag", "ws://h/p?k=REDACTED#frag"},
		{"ws://h/p/x@y?k=v", "ws://h/p/x@y?k=REDACTED"},
	} {
		if got := LogURL(c.in, false); got != c.want {
			t.Errorf("LogURL(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	if got := LogURL("ws://h/p?token=abc", true); got != "ws://h/p?token=abc" {
		t.Errorf("with the query: %q", got)
	}
	if n := testing.AllocsPerRun(100, func() { LogURL("ws://h:8080/socket", false) }); n != 0 {
		t.Errorf("a URL without a query: %v allocations, want 0", n)
	}
}

// FuzzLogURL: whatever the client's URL, its redacted form carries no
// query value and no password.
func FuzzLogURL(f *testing.F) {
	for _, s := range []string{"ws://h/p?token=abc&room=1", "ws://u:pw@h/?x", "ws://h/p?k=v#f", "ws://h", "?a=b", "ws://h/?=&=x&&"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, u string) {
		got := LogURL(u, false)
		if LogURL(u, true) != u && !strings.Contains(u, "@") {
			t.Fatalf("with the query, %q became %q", u, LogURL(u, true))
		}
		authority := 0
		if i := strings.Index(got, "://"); i >= 0 && !strings.ContainsAny(got[:i], "/?#") {
			authority = i + 3
		}
		hostEnd := len(got)
		if i := strings.IndexAny(got[authority:], "/?#"); i >= 0 {
			hostEnd = authority + i
		}
		if at := strings.LastIndexByte(got[authority:hostEnd], '@'); at >= 0 {
			if _, pw, ok := strings.Cut(got[authority:authority+at], ":"); ok && pw != "xxxxx" {
				t.Fatalf("%q logged as %q: a password", u, got)
			}
		}
		q := strings.IndexByte(got[hostEnd:], '?')
		if f := strings.IndexByte(got[hostEnd:], '#'); q < 0 || f >= 0 && f < q {
			return
		}
		query, _, _ := strings.Cut(got[hostEnd+q+1:], "#")
		for item := range strings.SplitSeq(query, "&") {
			if _, v, ok := strings.Cut(item, "="); (ok && v != queryRedacted) || (!ok && item != "" && item != queryRedacted) {
				t.Fatalf("%q logged as %q: item %q", u, got, item)
			}
		}
	})
}
