package frontdoor

import (
	"strings"
	"testing"
)

func TestOriginPatterns(t *testing.T) {
	valid := []string{
		"https://app.example.com", "http://localhost:3000", "https://*.example.com",
		"HTTPS://App.Example.COM", "https://app.example.com:443", "https://[::1]:8443",
		"chrome-extension://abcdefghijklmnop", "https://*.localhost", "http://127.0.0.1:8080",
		"https://xn--bcher-kva.example",
	}
	invalid := []string{
		"", "null", "*", "https://", "https://*", "https://*.", "https://.example.com",
		"https://a..b", "https://exa mple.com", "https://a.example.com:", "https://a.example.com:x",
		"https://[::1", "https://[1.2.3.4]", "https://[::1]x", "ftp//x", "1https://a",
		"https://app.example.com/", "https://app.example.com?x", "https://app.example.com#x",
		"https://u@app.example.com", "https://bücher.example", "https://*.*.example.com",
		"https://a*.example.com", "https://app.example.com.", "https://" + strings.Repeat("a", 64) + ".com",
		"https://a.example.com:65536", "https://a.example.com:0",
	}
	for _, s := range valid {
		if err := CheckOriginPattern(s); err != nil {
			t.Errorf("CheckOriginPattern(%q) = %v, want nil", s, err)
		}
	}
	for _, s := range invalid {
		if err := CheckOriginPattern(s); err == nil {
			t.Errorf("CheckOriginPattern(%q) = nil, want an error", s)
		}
	}
	if _, err := ParseOrigins([]string{"https://ok.example", "bad"}); err == nil || !strings.Contains(err.Error(), `"bad"`) {
		t.Errorf("ParseOrigins with a bad origin: %v", err)
	}
}

var originTests = []struct {
	origin string
	ok     bool
}{
	{"https://app.example.com", true},
	{"https://APP.Example.com", true},
	{"https://app.example.com:443", true},
	{"https://app.example.com:8443", false},
	{"http://app.example.com", false},
	{"https://a.example.com", true},
	{"https://a.b.example.com", true},
	{"https://example.com", false},
	{"https://example.com.evil.com", false},
	{"https://a.example.com.evil.com", false},
	{"https://evilexample.com", false},
	{"https://evil.com/https://a.example.com", false},
	{"https://a.example.com/", false},
	{"https://u@a.example.com", false},
	{"http://a.example.com", false},
	{"wss://a.example.com", false},
	{"https://*.example.com", false},
	{"https://a.example.com.", false},
	{"http://localhost:3000", true},
	{"http://localhost", false},
	{"http://localhost:3001", false},
	{"https://[::1]:8443", true},
	{"https://[0:0::1]:8443", true},
	{"https://[::2]:8443", false},
	{"null", false},
	{"", false},
}

func TestOriginAllowed(t *testing.T) {
	list, err := ParseOrigins([]string{
		"https://app.example.com", "https://*.example.com", "http://localhost:3000", "https://[::1]:8443",
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range originTests {
		if got := list.Allowed(tt.origin); got != tt.ok {
			t.Errorf("Allowed(%q) = %v, want %v", tt.origin, got, tt.ok)
		}
	}
}

func FuzzOrigin(f *testing.F) {
	for _, tt := range originTests {
		f.Add(tt.origin)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parseOrigin(s, true)
		if err != nil {
			return
		}
		// The canonical form parses to the same pattern.
		host := p.host
		if p.wildcard {
			host = "*" + host
		}
		canon := p.scheme + "://" + host
		if p.port != "" {
			canon += ":" + p.port
		}
		q, err := parseOrigin(canon, true)
		if err != nil || q != p {
			t.Fatalf("%q parsed as %+v; its canonical form %q as %+v, %v", s, p, canon, q, err)
		}
	})
}
