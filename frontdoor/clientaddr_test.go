package frontdoor

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

func TestParseTrustedProxy(t *testing.T) {
	tests := []struct{ in, want string }{
		{"10.0.0.0/8", "10.0.0.0/8"},
		{"10.1.2.3/8", "10.0.0.0/8"}, // masked
		{"192.168.1.7", "192.168.1.7/32"},
		{"fd00::/8", "fd00::/8"},
		{"2001:db8::1", "2001:db8::1/128"},
		{"::ffff:10.0.0.0/104", "10.0.0.0/8"},
		{"::ffff:10.0.0.1", "10.0.0.1/32"},
		{"0.0.0.0/0", "0.0.0.0/0"},
		{"", ""},
		{"10.0.0.0/33", ""},
		{"10.0.0.300", ""},
		{"10.0.0.0/", ""},
		{"fe80::1%eth0", ""},
		{"fe80::1%eth0/64", ""},
		{"proxy.internal", ""},
		{" 10.0.0.1", ""}, // LoadConfig trims; the parser does not
	}
	for _, tt := range tests {
		p, err := ParseTrustedProxy(tt.in)
		got := ""
		if err == nil {
			got = p.String()
		}
		if got != tt.want {
			t.Errorf("ParseTrustedProxy(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

// resolveTests are shared by TestResolveClient and the fuzz seeds.
var resolveTests = []struct {
	name     string
	trusted  string // comma-separated
	remote   string
	xff, fwd []string
	wantAddr string
	wantXFF  string
}{
	{"no trusted proxies: headers ignored", "", "203.0.113.9:5000", []string{"198.51.100.7"}, nil, "203.0.113.9:5000", ""},
	{"spoofed XFF from an untrusted peer", "10.0.0.0/8", "203.0.113.9:5000", []string{"198.51.100.7"}, nil, "203.0.113.9:5000", ""},
	{"spoofed Forwarded from an untrusted peer", "10.0.0.0/8", "203.0.113.9:5000", nil, []string{"for=198.51.100.7"}, "203.0.113.9:5000", ""},
	{"trusted peer without headers", "10.0.0.0/8", "10.0.0.1:5000", nil, nil, "10.0.0.1:5000", ""},
	{"trusted peer names the client", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7"}, nil, "198.51.100.7", "198.51.100.7"},
	{"rightmost untrusted entry wins over a spoof", "10.0.0.0/8", "10.0.0.1:5000", []string{"6.6.6.6, 198.51.100.7"}, nil, "198.51.100.7", "6.6.6.6, 198.51.100.7"},
	{"trusted hops are skipped and dropped", "10.0.0.0/8", "10.0.0.1:5000", []string{"6.6.6.6, 198.51.100.7, 10.1.1.1,10.2.2.2"}, nil, "198.51.100.7", "6.6.6.6, 198.51.100.7"},
	{"several header fields are one list", "10.0.0.0/8", "10.0.0.1:5000", []string{"6.6.6.6", "198.51.100.7, 10.1.1.1"}, nil, "198.51.100.7", "6.6.6.6, 198.51.100.7"},
	{"every hop trusted: the farthest", "10.0.0.0/8", "10.0.0.1:5000", []string{"10.1.1.1, 10.2.2.2"}, nil, "10.1.1.1", "10.1.1.1"},
	{"malformed rightmost entry: the peer", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7, garbage"}, nil, "10.0.0.1:5000", ""},
	{"malformed entry stops the walk at the nearest trusted hop", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7, unknown, 10.2.2.2"}, nil, "10.2.2.2", "198.51.100.7, unknown, 10.2.2.2"},
	{"empty entries are skipped", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7,, ,"}, nil, "198.51.100.7", "198.51.100.7"},
	{"IPv4 with a port", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7:4711"}, nil, "198.51.100.7", "198.51.100.7"},
	{"IPv4-mapped IPv6 is IPv4", "10.0.0.0/8", "10.0.0.1:5000", []string{"::ffff:198.51.100.7"}, nil, "198.51.100.7", "198.51.100.7"},
	{"mapped trusted hop", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7, ::ffff:10.3.3.3"}, nil, "198.51.100.7", "198.51.100.7"},
	{"IPv6 peer and client", "fd00::/8", "[fd00::1]:443", []string{"2001:db8::7"}, nil, "2001:db8::7", "2001:db8::7"},
	{"IPv6 in brackets with a port", "fd00::/8", "[fd00::1]:443", []string{"[2001:DB8::7]:1234"}, nil, "2001:db8::7", "2001:db8::7"},
	{"IPv6 in brackets", "fd00::/8", "[fd00::1]:443", []string{"[2001:db8::7]"}, nil, "2001:db8::7", "2001:db8::7"},
	{"IPv6 zone is malformed", "fd00::/8", "[fd00::1]:443", []string{"fe80::1%eth0"}, nil, "[fd00::1]:443", ""},
	{"IPv4-mapped peer is trusted", "10.0.0.0/8", "[::ffff:10.0.0.1]:5000", []string{"198.51.100.7"}, nil, "198.51.100.7", "198.51.100.7"},
	{"peer without an IP", "10.0.0.0/8", "@", []string{"198.51.100.7"}, nil, "@", ""},
	{"Forwarded", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{"for=198.51.100.7;proto=https;by=10.0.0.1"}, "198.51.100.7", "198.51.100.7"},
	{"Forwarded chain with quoted IPv6", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{`for=6.6.6.6, for="[2001:db8::7]:4711", for=10.1.1.1`}, "2001:db8::7", "2001:db8::7"},
	{"Forwarded name is case-insensitive, quoted IPv4 port", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{`For="198.51.100.7:80"`}, "198.51.100.7", "198.51.100.7"},
	{"Forwarded unquoted IPv6", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{`for=[2001:db8::7]`}, "2001:db8::7", "2001:db8::7"},
	{"Forwarded comma inside quotes", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{`for=198.51.100.7;ext="a,b", for=10.1.1.1`}, "198.51.100.7", "198.51.100.7"},
	{"Forwarded obfuscated hop stops the walk", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{"for=6.6.6.6, for=_hidden, for=10.1.1.1"}, "10.1.1.1", "10.1.1.1"},
	{"Forwarded unknown", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{"for=unknown"}, "10.0.0.1:5000", ""},
	{"Forwarded element without for", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{"for=6.6.6.6, proto=https"}, "10.0.0.1:5000", ""},
	{"Forwarded unterminated quote", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{`for="198.51.100.7`}, "10.0.0.1:5000", ""},
	{"Forwarded duplicate for", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{"for=6.6.6.6;for=198.51.100.7"}, "10.0.0.1:5000", ""},
	{"Forwarded space around =", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{"for = 198.51.100.7"}, "10.0.0.1:5000", ""},
	{"Forwarded escaped quote", "10.0.0.0/8", "10.0.0.1:5000", nil, []string{`for="198.51.100.7\"", for=10.1.1.1`}, "10.1.1.1", "10.1.1.1"},
	// A proxy that appends to one header passes the other on as the
	// client wrote it: when they disagree, neither is believed.
	{"X-Forwarded-For and Forwarded disagree: the peer", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7"}, []string{"for=6.6.6.6"}, "10.0.0.1:5000", ""},
	{"Forwarded and X-Forwarded-For disagree: the peer", "10.0.0.0/8", "10.0.0.1:5000", []string{"6.6.6.6"}, []string{"for=198.51.100.7"}, "10.0.0.1:5000", ""},
	{"X-Forwarded-For and Forwarded agree", "10.0.0.0/8", "10.0.0.1:5000", []string{"6.6.6.6, 198.51.100.7"}, []string{"for=198.51.100.7"}, "198.51.100.7", "6.6.6.6, 198.51.100.7"},
	{"unreadable X-Forwarded-For: Forwarded", "10.0.0.0/8", "10.0.0.1:5000", []string{"garbage"}, []string{"for=198.51.100.7"}, "198.51.100.7", "198.51.100.7"},
	{"unreadable Forwarded: X-Forwarded-For", "10.0.0.0/8", "10.0.0.1:5000", []string{"198.51.100.7"}, []string{"for=unknown"}, "198.51.100.7", "198.51.100.7"},
	{"several trusted ranges", "10.0.0.0/8,192.168.0.0/16,fd00::/8", "10.0.0.1:5000", []string{"198.51.100.7, fd00::9, 192.168.4.4"}, nil, "198.51.100.7", "198.51.100.7"},
}

func parsePrefixes(t testing.TB, list string) []netip.Prefix {
	var out []netip.Prefix
	for s := range strings.SplitSeq(list, ",") {
		if s == "" {
			continue
		}
		p, err := ParseTrustedProxy(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

func TestResolveClient(t *testing.T) {
	for _, tt := range resolveTests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			for _, v := range tt.xff {
				h.Add("X-Forwarded-For", v)
			}
			for _, v := range tt.fwd {
				h.Add("Forwarded", v)
			}
			trusted := parsePrefixes(t, tt.trusted)
			got := ResolveClient(trusted, tt.remote, h)
			if got.Addr != tt.wantAddr || got.XFF != tt.wantXFF {
				t.Errorf("got addr %q, xff %q; want %q, %q", got.Addr, got.XFF, tt.wantAddr, tt.wantXFF)
			}
			peer, err := netip.ParseAddrPort(tt.remote)
			if want := err == nil && TrustedAddr(trusted, peer.Addr().Unmap()); got.TrustedPeer != want {
				t.Errorf("trustedPeer = %v, want %v", got.TrustedPeer, want)
			}
		})
	}
}

// FuzzResolveClient: whatever the headers say, the client is the peer or
// an IP address, and the X-Forwarded-For sent upstream ends with it.
func FuzzResolveClient(f *testing.F) {
	for _, tt := range resolveTests {
		f.Add(strings.Join(tt.xff, "\n"), strings.Join(tt.fwd, "\n"))
	}
	trusted := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}
	const peer = "10.0.0.1:5000"
	f.Fuzz(func(t *testing.T, xff, fwd string) {
		h := http.Header{}
		if xff != "" {
			h["X-Forwarded-For"] = strings.Split(xff, "\n")
		}
		if fwd != "" {
			h["Forwarded"] = strings.Split(fwd, "\n")
		}
		cl := ResolveClient(trusted, peer, h)
		if cl.Addr == peer {
			if cl.XFF != "" {
				t.Fatalf("peer as client, but xff %q", cl.XFF)
			}
			return
		}
		ip, err := netip.ParseAddr(cl.Addr)
		if err != nil || ip.Zone() != "" || ip.Is4In6() {
			t.Fatalf("client %q is not a plain IP address", cl.Addr)
		}
		if cl.XFF != cl.Addr && !strings.HasSuffix(cl.XFF, ", "+cl.Addr) {
			t.Fatalf("xff %q does not end with the client %q", cl.XFF, cl.Addr)
		}
		if !ClientKey(cl.Addr).IsValid() {
			t.Fatalf("client %q has no key", cl.Addr)
		}
	})
}

func TestClientKey(t *testing.T) {
	tests := []struct{ in, want string }{
		{"198.51.100.7:5000", "198.51.100.7"},
		{"198.51.100.7", "198.51.100.7"},
		{"[::ffff:198.51.100.7]:80", "198.51.100.7"},
		{"[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::"},
		{"2001:db8:1:2:ffff::1", "2001:db8:1:2::"},
		{"@", "invalid IP"},
		{"", "invalid IP"},
	}
	for _, tt := range tests {
		if got := ClientKey(tt.in).String(); got != tt.want {
			t.Errorf("ClientKey(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}
