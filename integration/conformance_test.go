package integration

// The differential RFC 6455 conformance suite. A raw-frame client plays each
// case's script of bytes twice at once: straight to a plain gorilla echo
// backend, and to the same backend through sluice. What the client observes
// on both paths must be the same: the same frames (opcode, FIN, RSV,
// payload; how the bytes were split into TCP reads does not matter), and
// the same close code. Close reasons are recorded, not compared: they are
// each implementation's prose.
//
// The cases follow the sections of the Autobahn testsuite (1 framing,
// 2 pings and pongs, 3 reserved bits, 4 opcodes, 5 fragmentation, 6 UTF-8,
// 7 close, 9-lite limits) plus unmasked frames and valid messages followed
// by a bad frame. Where sluice answers differently on purpose, the case is
// in deliberateDifferences with the reason, and the test holds sluice to
// its own answer instead.
//
// One rule applies to every case: the order of data frames and the order of
// control frames (pings and pongs) must each be the same, but a pong may
// overtake a data frame through sluice, because sluice's writer takes
// control frames first (README, "priority lane"; never inside a frame).
// Which one the backend wrote first is decided by scheduling in the backend,
// not by the client, whenever both were in flight together.
//
// And one rule goes beyond the reference: through sluice the connection
// must end with a FIN, never a TCP reset. A server that closes its socket
// with the client's bytes (its close reply, or anything it sent after a bad
// frame) unread sends a reset, and a reset can destroy the close frame
// before the client has read it (RFC 6455 §7.1.1 wants the server to close
// the TCP connection cleanly, after the close handshake). gorilla closes
// without waiting for the reply and so resets now and then; that is only
// reported.
//
//	go test -race -run Conformance -v ./integration/
//
// prints a table of every case with both close codes, both reasons and how
// each TCP connection ended (eof, or reset). One section, or all but some
// cases:
//
//	go test -race -run 'Conformance/case/^2\.' ./integration/
//	go test -race -run Conformance -skip 'Conformance/case/(2.ping.burst-10|3.rsv1.text)$' ./integration/

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/gobwas/ws"

	"github.com/sluice-proxy/sluice/internal/wstest"
	"github.com/sluice-proxy/sluice/proxy"
)

// confLimit is the limit of the 9-lite cases: sluice's MaxFrameBytes and
// MaxMessageBytes, and the direct backend's SetReadLimit. It stays under
// gorilla's 4 KiB write buffer so that the backend echoes nothing of a
// message before it refuses it, on either path.
const confLimit = 1024

// confParallel bounds the cases in flight at once (each has two
// connections, four sockets through sluice); the machine has two cores.
const confParallel = 3

// confDifference is a case where sluice answers differently from the
// reference on purpose.
type confDifference struct {
	direct int    // the close code the reference sends (noClose: none)
	sluice int    // the close code sluice must send
	why    string // why sluice differs
	// unframed: after the bad frame the client's bytes cannot be framed
	// (its close reply sits "inside" a payload that never ends), so sluice
	// cannot read to the reply before closing, and a reset is allowed.
	unframed bool
}

// deliberateDifferences lists every case in which sluice must not answer as
// the reference does. The data frames before the close must still match.
var deliberateDifferences = map[string]confDifference{
	"7.close.1-byte-payload": {direct: 1005, sluice: 1002,
		why: "a close body must begin with a 2-byte code (RFC 6455 §5.5.1; Autobahn 7.3.2 expects a failure); " +
			"gorilla reads a 1-byte body as no code at all and answers with an empty close"},
	"7.close.reason-invalid-utf8": {direct: 1002, sluice: 1007,
		why: "1007 is the code for data that does not match its type (RFC 6455 §7.4.1, §8.1); sluice's README promises it for a close reason " +
			"that is not UTF-8; gorilla sends 1002"},
	"7.close.reason-truncated-utf8": {direct: 1002, sluice: 1007,
		why: "as 7.close.reason-invalid-utf8: a reason cut inside a code point is not UTF-8"},
	"7.close.reason-surrogate": {direct: 1002, sluice: 1007,
		why: "as 7.close.reason-invalid-utf8: an encoded UTF-16 surrogate is not UTF-8"},
	"1.binary.len-64bit-msb-set": {direct: noClose, sluice: 1002,
		why: "a 64-bit length with its top bit set is a protocol error (RFC 6455 §5.2); " +
			"gorilla reads it as a negative length, fails with ErrReadLimit and drops the connection without a close frame",
		unframed: true},
	"1.text.len-64bit-msb-set": {direct: noClose, sluice: 1002,
		why: "as 1.binary.len-64bit-msb-set", unframed: true},
}

// confCase is one script: writes in order. A script that does not close
// (a protocol-error case) waits for the server's close and answers it.
type confCase struct {
	name    string
	writes  []confWrite
	limited bool // against the backend's read limit and sluice's frame and message limits
}

func (c confCase) clientCloses() bool {
	for _, w := range c.writes {
		for _, f := range w.frames {
			if f.close {
				return true
			}
		}
	}
	return false
}

// confResult is one case's outcome, for the summary.
type confResult struct {
	name           string
	direct, sluice confTrace
	problems       []string
}

func TestConformance(t *testing.T) {
	b := newBackend(t)
	backendAddr := b.srv.Listener.Addr().String()
	plain := startSluice(t, b.url, nil)
	limited := startSluice(t, b.url, func(o *proxy.Options) {
		o.MaxFrameBytes = confLimit
		o.MaxMessageBytes = confLimit
	})

	cases := confCases()
	if len(cases) < 200 {
		t.Errorf("only %d cases", len(cases))
	}
	names := map[string]bool{}
	for _, c := range cases {
		if names[c.name] {
			t.Fatalf("two cases are named %s", c.name)
		}
		names[c.name] = true
	}
	for name := range deliberateDifferences {
		if !names[name] {
			t.Errorf("deliberateDifferences names %s, which is no case", name)
		}
	}

	var (
		mu      sync.Mutex
		results []confResult // guarded by mu
	)
	slots := make(chan struct{}, confParallel)
	t.Run("case", func(t *testing.T) {
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				t.Parallel()
				slots <- struct{}{}
				defer func() { <-slots }()
				path, via := "/conformance", plain
				if c.limited {
					path, via = fmt.Sprintf("/conformance?limit=%d", confLimit), limited
				}
				direct := wstest.Dial(t, backendAddr, path, nil, nil)
				proxied := wstest.Dial(t, via.addr, path, nil, nil)
				var (
					wg   sync.WaitGroup
					d, s confTrace
				)
				wg.Add(2)
				go func() { defer wg.Done(); d = play(direct, c) }()
				go func() { defer wg.Done(); s = play(proxied, c) }()
				wg.Wait()

				problems := confCompare(c.name, d, s)
				mu.Lock()
				results = append(results, confResult{name: c.name, direct: d, sluice: s, problems: problems})
				mu.Unlock()
				for _, p := range problems {
					t.Error(p)
				}
				if len(problems) > 0 {
					t.Logf("direct: %s", d.describe())
					t.Logf("sluice: %s", s.describe())
				}
			})
		}
	})
	confSummary(t, results)
}

// confCompare returns how the sluice trace s differs from the direct trace
// d beyond what the case allows.
func confCompare(name string, d, s confTrace) []string {
	var problems []string
	want := d.code
	if dd, ok := deliberateDifferences[name]; ok {
		if d.code != dd.direct {
			problems = append(problems, fmt.Sprintf("the reference closed with %s; deliberateDifferences says %d: update the table", d.closeString(), dd.direct))
		}
		want = dd.sluice
	} else if d.code == noClose {
		problems = append(problems, fmt.Sprintf("the reference sent no close frame (%s): the case or the reference is broken", d.end))
	}
	if s.code != want {
		problems = append(problems, fmt.Sprintf("close via sluice: %s (connection: %s), want code %d (reference: %s)", s.closeString(), s.end, want, d.closeString()))
	}
	dData, dCtl := splitFrames(d.frames)
	sData, sCtl := splitFrames(s.frames)
	if p := compareFrames("data frames", dData, sData); p != "" {
		problems = append(problems, p)
	}
	if p := compareFrames("control frames", dCtl, sCtl); p != "" {
		problems = append(problems, p)
	}
	if len(s.after) > 0 {
		problems = append(problems, fmt.Sprintf("sluice sent %d frames after its close frame, first %v", len(s.after), s.after[0]))
	}
	if s.reset && !deliberateDifferences[name].unframed {
		problems = append(problems, fmt.Sprintf("via sluice the connection ended with a TCP reset (%s) instead of a FIN: the client's close reply or later bytes were left unread", s.end))
	}
	return problems
}

func splitFrames(fs []confFrame) (data, control []confFrame) {
	for _, f := range fs {
		if f.op.IsControl() {
			control = append(control, f)
		} else {
			data = append(data, f)
		}
	}
	return data, control
}

func compareFrames(what string, want, got []confFrame) string {
	for i := 0; i < min(len(want), len(got)); i++ {
		if !want[i].equal(got[i]) {
			return fmt.Sprintf("%s: #%d via sluice is %v, want %v (%d via sluice, %d direct)", what, i, got[i], want[i], len(got), len(want))
		}
	}
	switch {
	case len(got) < len(want):
		return fmt.Sprintf("%s: %d via sluice, want %d; first missing: %v", what, len(got), len(want), want[len(got)])
	case len(got) > len(want):
		return fmt.Sprintf("%s: %d via sluice, want %d; first extra: %v", what, len(got), len(want), got[len(want)])
	}
	return ""
}

// confSummary logs one line per case (seen with -v) and counts resets.
func confSummary(t *testing.T, results []confResult) {
	sort.Slice(results, func(i, j int) bool { return results[i].name < results[j].name })
	var sb strings.Builder
	var failed, directResets, sluiceResets int
	fmt.Fprintf(&sb, "%d cases: case | direct close, end | sluice close, end | verdict\n", len(results))
	for _, r := range results {
		verdict := "same"
		if _, ok := deliberateDifferences[r.name]; ok {
			verdict = "deliberate difference"
		}
		if len(r.problems) > 0 {
			verdict = "FAIL: " + r.problems[0]
			failed++
		}
		if r.direct.reset {
			directResets++
		}
		if r.sluice.reset {
			sluiceResets++
		}
		fmt.Fprintf(&sb, "%s | %s, %s | %s, %s | %s\n", r.name, r.direct.closeString(), r.direct.end, r.sluice.closeString(), r.sluice.end, verdict)
	}
	fmt.Fprintf(&sb, "%d failed; connections ended by a reset: %d direct, %d via sluice", failed, directResets, sluiceResets)
	t.Log(sb.String())
}

// --- the cases -------------------------------------------------------------

// pat is n bytes of printable ASCII (valid UTF-8) that differ per seed.
func pat(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = 'a' + byte((i+int(seed))%26)
	}
	return p
}

// bytesPat is n bytes covering every octet value.
func bytesPat(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*7) + seed
	}
	return p
}

func one(frames ...wire) confWrite { return confWrite{frames: frames} }

func chopped(chop int, frames ...wire) confWrite { return confWrite{frames: frames, chop: chop} }

// closing is a script whose writes end with a normal close, in the last
// write.
func closing(writes ...confWrite) []confWrite {
	last := &writes[len(writes)-1]
	last.frames = append(append([]wire(nil), last.frames...), closeW(ws.StatusNormalClosure, "done"))
	return writes
}

var dataOps = []struct {
	name string
	op   ws.OpCode
	body func(n int, seed byte) []byte
}{
	{"text", ws.OpText, pat},
	{"binary", ws.OpBinary, bytesPat},
}

func confCases() []confCase {
	var cs []confCase
	add := func(name string, writes ...confWrite) {
		cs = append(cs, confCase{name: name, writes: writes})
	}
	cs = framingCases(cs)
	cs = pingCases(cs)
	cs = rsvCases(cs)
	cs = opcodeCases(cs)
	cs = fragmentCases(cs)
	cs = utf8Cases(cs)
	cs = closeCases(cs)
	cs = limitCases(cs)

	// Unmasked client frames: a server must fail the connection (§5.1).
	for _, u := range []struct {
		name string
		f    frameSpec
	}{
		{"text", frameSpec{Fin: true, Op: ws.OpText, Payload: []byte("unmasked")}},
		{"binary", frameSpec{Fin: true, Op: ws.OpBinary, Payload: []byte{1, 2, 3}}},
		{"ping", frameSpec{Fin: true, Op: ws.OpPing, Payload: []byte("p")}},
		{"pong", frameSpec{Fin: true, Op: ws.OpPong, Payload: []byte("p")}},
		{"close", frameSpec{Fin: true, Op: ws.OpClose, Payload: closePayload(1000, "")}},
		{"empty-text", frameSpec{Fin: true, Op: ws.OpText}},
	} {
		u.f.Unmasked = true
		w := u.f.wire()
		w.close = false // the server must not take it as a close
		add("8.unmasked."+u.name, one(w))
	}
	add("8.unmasked.continuation",
		one(frag(false, ws.OpText, []byte("masked start")), frameSpec{Fin: true, Op: ws.OpContinuation, Payload: []byte("unmasked end"), Unmasked: true}.wire()))

	// A valid message, then a bad frame in the same write: the echo of the
	// valid message must come before the 1002 (the server read it first).
	bad := []struct {
		name string
		w    []wire
	}{
		{"rsv1", []wire{frameSpec{Fin: true, Rsv: 4, Op: ws.OpText, Payload: []byte("x")}.wire()}},
		{"opcode-3", []wire{frameSpec{Fin: true, Op: 3}.wire()}},
		{"opcode-0xB", []wire{frameSpec{Fin: true, Op: 0xB}.wire()}},
		{"unmasked", []wire{frameSpec{Fin: true, Op: ws.OpText, Payload: []byte("u"), Unmasked: true}.wire()}},
		{"continuation-alone", []wire{frag(true, ws.OpContinuation, []byte("c"))}},
		{"ping-126", []wire{ping(pat(126, 0))}},
		{"fragmented-ping", []wire{frameSpec{Op: ws.OpPing, Payload: []byte("f")}.wire()}},
		{"close-999", []wire{closeRaw(closePayload(999, ""))}},
		{"start-inside-message", []wire{frag(false, ws.OpText, []byte("a")), frag(true, ws.OpText, []byte("b"))}},
	}
	for _, x := range bad {
		for i := range x.w {
			x.w[i].close = false
		}
		add("10.valid-then-bad."+x.name, one(append([]wire{txt("hello")}, x.w...)...))
	}
	ten := make([]wire, 10)
	for i := range ten {
		ten[i] = txt(fmt.Sprintf("message %d", i))
	}
	add("10.ten-valid-then-bad", one(append(ten, frameSpec{Fin: true, Op: 5}.wire())...))
	add("10.ping-then-bad", one(ping([]byte("before")), frameSpec{Fin: true, Op: 6}.wire()))
	add("10.binary-64KiB-then-bad", one(bin(bytesPat(64<<10, 1)), frameSpec{Fin: true, Op: 7}.wire()))
	add("10.valid-then-bad-separate-writes", one(txt("hello")), one(frameSpec{Fin: true, Op: 4}.wire()))
	// More bytes after the bad frame, in the same write (kept under the
	// reference's 4 KiB read buffer so that it reads them all and closes
	// without a reset).
	add("10.bad-then-more-messages", one(append([]wire{frameSpec{Fin: true, Rsv: 2, Op: ws.OpText, Payload: []byte("bad")}.wire()}, ten...)...))
	add("10.bad-then-close", one(frameSpec{Fin: true, Rsv: 1, Op: ws.OpBinary}.wire(), closeW(1000, "")))
	add("10.valid-bad-more", one(append(append([]wire{txt("first")}, frameSpec{Fin: true, Op: 0xC}.wire()), ten...)...))
	return cs
}

// framingCases: section 1, text and binary messages of every length class.
func framingCases(cs []confCase) []confCase {
	add := func(name string, writes ...confWrite) {
		cs = append(cs, confCase{name: name, writes: writes})
	}
	for _, d := range dataOps {
		for _, n := range []int{0, 1, 125, 126, 127, 65535, 65536, 1 << 17} {
			add(fmt.Sprintf("1.%s.len%d", d.name, n), closing(one(frag(true, d.op, d.body(n, 1))))...)
		}
		for _, n := range []int{0, 1, 125, 126, 127} {
			add(fmt.Sprintf("1.%s.len%d-chopped", d.name, n), closing(chopped(1, frag(true, d.op, d.body(n, 2))))...)
		}
		// Lengths in a longer form than needed: RFC 6455 §5.2 asks for the
		// minimal form, but neither side is required to refuse others.
		for _, e := range []struct{ n, lenBytes int }{{0, 2}, {5, 2}, {125, 2}, {0, 8}, {5, 8}, {125, 8}, {300, 8}, {65535, 8}} {
			add(fmt.Sprintf("1.%s.len%d-in-%dbit", d.name, e.n, e.lenBytes*8),
				closing(one(frameSpec{Fin: true, Op: d.op, Payload: d.body(e.n, 3), LenBytes: e.lenBytes}.wire()))...)
		}
		for _, k := range []int{10, 100} {
			ms := make([]wire, k)
			for i := range ms {
				ms[i] = frag(true, d.op, d.body(i*13%300, byte(i)))
			}
			add(fmt.Sprintf("1.%s.%d-in-one-write", d.name, k), closing(one(ms...))...)
		}
		// The top bit of a 64-bit length must be 0 (§5.2).
		mask := ws.NewMask()
		add(fmt.Sprintf("1.%s.len-64bit-msb-set", d.name),
			one(wire{b: header(true, 0, d.op, mask[:], 8, 1<<63|5)}))
	}
	return cs
}

// pingCases: section 2.
func pingCases(cs []confCase) []confCase {
	add := func(name string, writes ...confWrite) {
		cs = append(cs, confCase{name: name, writes: writes})
	}
	for n := 0; n <= 125; n += 5 {
		add(fmt.Sprintf("2.ping.len%d", n), closing(one(ping(pat(n, byte(n)))))...)
	}
	add("2.ping.len124", closing(one(ping(pat(124, 9))))...)
	add("2.ping.len125-binary", closing(one(ping(bytesPat(125, 0x80))))...)
	add("2.ping.len125-chopped", closing(chopped(1, ping(pat(125, 4))))...)
	// Lengths of control frames in a longer form than needed (legal, as
	// in section 1): the frame is longer on the wire than 2+4+125 bytes.
	add("2.ping.len125-in-64bit", closing(one(frameSpec{Fin: true, Op: ws.OpPing, Payload: pat(125, 5), LenBytes: 8}.wire()))...)
	add("2.ping.len125-in-16bit", closing(one(frameSpec{Fin: true, Op: ws.OpPing, Payload: pat(125, 6), LenBytes: 2}.wire()))...)
	add("2.ping.len5-in-64bit", closing(one(frameSpec{Fin: true, Op: ws.OpPing, Payload: pat(5, 7), LenBytes: 8}.wire()))...)
	for _, k := range []int{10, 1000} {
		ps := make([]wire, k)
		for i := range ps {
			ps[i] = ping([]byte(fmt.Sprintf("ping %04d", i)))
		}
		add(fmt.Sprintf("2.ping.burst-%d", k), closing(one(ps...))...)
	}
	ps := make([]wire, 10)
	for i := range ps {
		ps[i] = ping([]byte(fmt.Sprintf("chop %d", i)))
	}
	add("2.ping.burst-10-chopped", closing(chopped(1, ps...))...)
	big := make([]wire, 1000)
	for i := range big {
		big[i] = ping(append([]byte(fmt.Sprintf("%04d", i)), pat(121, byte(i))...))
	}
	add("2.ping.burst-1000-len125", closing(one(big...))...)
	add("2.ping.then-text", closing(one(ping([]byte("p")), txt("t")))...)
	add("2.ping.after-text", closing(one(txt("t"), ping([]byte("p"))))...)
	add("2.ping.after-close", one(closeW(1000, ""), ping([]byte("late"))))

	add("2.pong.unsolicited-empty", closing(one(pong(nil), txt("after pong")))...)
	add("2.pong.unsolicited-125", closing(one(pong(pat(125, 6)), txt("after pong")))...)
	pongs := make([]wire, 10)
	for i := range pongs {
		pongs[i] = pong([]byte{byte(i)})
	}
	add("2.pong.unsolicited-10", closing(one(append(pongs, ping([]byte("then ping")))...))...)
	add("2.pong.unsolicited-then-ping", closing(one(pong([]byte("unasked")), ping([]byte("asked"))))...)
	return cs
}

// rsvCases: section 3, each RSV combination on each kind of frame; no
// extension is negotiated, so every one is a protocol error.
func rsvCases(cs []confCase) []confCase {
	for rsv := byte(1); rsv <= 7; rsv++ {
		kinds := []struct {
			name string
			w    []wire
		}{
			{"text", []wire{frameSpec{Fin: true, Rsv: rsv, Op: ws.OpText, Payload: []byte("rsv")}.wire()}},
			{"binary", []wire{frameSpec{Fin: true, Rsv: rsv, Op: ws.OpBinary, Payload: []byte{0xff, 0}}.wire()}},
			{"ping", []wire{frameSpec{Fin: true, Rsv: rsv, Op: ws.OpPing, Payload: []byte("p")}.wire()}},
			{"pong", []wire{frameSpec{Fin: true, Rsv: rsv, Op: ws.OpPong}.wire()}},
			{"close", []wire{frameSpec{Fin: true, Rsv: rsv, Op: ws.OpClose, Payload: closePayload(1000, "")}.wire()}},
			{"continuation", []wire{frag(false, ws.OpText, []byte("a")), frameSpec{Fin: true, Rsv: rsv, Op: ws.OpContinuation, Payload: []byte("b")}.wire()}},
		}
		for _, k := range kinds {
			for i := range k.w {
				k.w[i].close = false
			}
			cs = append(cs, confCase{name: fmt.Sprintf("3.rsv%d.%s", rsv, k.name), writes: []confWrite{one(k.w...)}})
		}
	}
	return cs
}

// opcodeCases: section 4, the reserved opcodes 3-7 and 0xB-0xF.
func opcodeCases(cs []confCase) []confCase {
	for _, op := range []ws.OpCode{3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF} {
		cs = append(cs,
			confCase{name: fmt.Sprintf("4.opcode-%#x.empty", byte(op)), writes: []confWrite{one(frameSpec{Fin: true, Op: op}.wire())}},
			confCase{name: fmt.Sprintf("4.opcode-%#x.payload", byte(op)), writes: []confWrite{one(frameSpec{Fin: true, Op: op, Payload: pat(10, 1)}.wire())}},
		)
	}
	return cs
}

// fragments splits body into n fragments of op.
func fragments(op ws.OpCode, body []byte, n int) []wire {
	var out []wire
	size := (len(body) + n - 1) / n
	for i := 0; i < n; i++ {
		lo, hi := min(i*size, len(body)), min((i+1)*size, len(body))
		o := op
		if i > 0 {
			o = ws.OpContinuation
		}
		out = append(out, frag(i == n-1, o, body[lo:hi]))
	}
	return out
}

// fragmentCases: section 5.
func fragmentCases(cs []confCase) []confCase {
	add := func(name string, writes ...confWrite) {
		cs = append(cs, confCase{name: name, writes: writes})
	}
	for _, d := range dataOps {
		for n := 2; n <= 10; n++ {
			add(fmt.Sprintf("5.%s.%d-fragments", d.name, n), closing(one(fragments(d.op, d.body(40, byte(n)), n)...))...)
		}
		add(fmt.Sprintf("5.%s.2-fragments-chopped", d.name), closing(chopped(1, fragments(d.op, d.body(20, 1), 2)...))...)
		fs := fragments(d.op, d.body(30, 2), 3)
		add(fmt.Sprintf("5.%s.fragments-in-separate-writes", d.name), closing(one(fs[0]), one(fs[1]), one(fs[2]))...)
		add(fmt.Sprintf("5.%s.ping-between-fragments", d.name),
			closing(one(frag(false, d.op, []byte("one ")), ping([]byte("between")), frag(true, ws.OpContinuation, []byte("two"))))...)
		add(fmt.Sprintf("5.%s.pong-between-fragments", d.name),
			closing(one(frag(false, d.op, []byte("one ")), pong([]byte("between")), frag(true, ws.OpContinuation, []byte("two"))))...)
		add(fmt.Sprintf("5.%s.2x64KiB-fragments", d.name), closing(one(fragments(d.op, d.body(128<<10, 3), 2)...))...)
		add(fmt.Sprintf("5.%s.1000-one-byte-fragments", d.name), closing(one(fragments(d.op, d.body(1000, 4), 1000)...))...)
	}
	add("5.text.3-pings-between-fragments",
		closing(one(frag(false, ws.OpText, []byte("a")), ping([]byte("1")), frag(false, ws.OpContinuation, []byte("b")),
			ping([]byte("2")), ping([]byte("3")), frag(true, ws.OpContinuation, []byte("c"))))...)
	add("5.text.ping-between-fragments-chopped",
		closing(chopped(1, frag(false, ws.OpText, []byte("one ")), ping([]byte("between")), frag(true, ws.OpContinuation, []byte("two"))))...)
	add("5.text.empty-fragments",
		closing(one(frag(false, ws.OpText, nil), frag(false, ws.OpContinuation, nil), frag(true, ws.OpContinuation, nil)))...)
	add("5.text.empty-first-fragment", closing(one(frag(false, ws.OpText, nil), frag(true, ws.OpContinuation, []byte("x"))))...)
	add("5.text.empty-last-fragment", closing(one(frag(false, ws.OpText, []byte("x")), frag(true, ws.OpContinuation, nil)))...)
	add("5.text.close-inside-message", one(frag(false, ws.OpText, []byte("never finished")), closeW(1000, "")))

	// Continuation with nothing to continue; a new message before the last
	// one ended; fragmented control frames; control frames over 125 bytes.
	add("5.continuation.alone-final", one(frag(true, ws.OpContinuation, []byte("c"))))
	add("5.continuation.alone-not-final", one(frag(false, ws.OpContinuation, []byte("c"))))
	add("5.continuation.after-complete-message", one(txt("done"), frag(true, ws.OpContinuation, []byte("c"))))
	add("5.continuation.alone-chopped", chopped(1, frag(true, ws.OpContinuation, []byte("c"))))
	add("5.start-inside.text-text", one(frag(false, ws.OpText, []byte("a")), frag(true, ws.OpText, []byte("b"))))
	add("5.start-inside.text-binary", one(frag(false, ws.OpText, []byte("a")), frag(true, ws.OpBinary, []byte("b"))))
	add("5.start-inside.binary-text-not-final", one(frag(false, ws.OpBinary, []byte("a")), frag(false, ws.OpText, []byte("b"))))
	add("5.start-inside.after-ping", one(frag(false, ws.OpText, []byte("a")), ping([]byte("p")), frag(true, ws.OpText, []byte("b"))))
	for _, c := range []struct {
		name string
		op   ws.OpCode
		p    []byte
	}{{"ping", ws.OpPing, []byte("p")}, {"pong", ws.OpPong, []byte("p")}, {"close", ws.OpClose, closePayload(1000, "")}} {
		w := frameSpec{Op: c.op, Payload: c.p}.wire()
		w.close = false
		add("5.fragmented-control."+c.name, one(w))
		add("5.fragmented-control."+c.name+"-with-continuation", one(w, frag(true, ws.OpContinuation, []byte("rest"))))
		long := frameSpec{Fin: true, Op: c.op, Payload: pat(126, 7)}.wire()
		long.close = false
		add("5.control-too-long."+c.name+"-126", one(long))
	}
	add("5.control-too-long.ping-65535", one(ping(pat(65535, 8))))
	return cs
}

// utf8Cases: section 6. Neither sluice (README) nor gorilla checks UTF-8
// in text messages: both echo invalid text as it came.
func utf8Cases(cs []confCase) []confCase {
	add := func(name string, writes ...confWrite) {
		cs = append(cs, confCase{name: name, writes: writes})
	}
	valid := []struct{ name, s string }{
		{"empty", ""},
		{"latin", "Hello-µ@ßöäüàá-UTF-8!!"},
		{"greek", "κόσμε"},
		{"u0080", "\u0080"},
		{"u07ff", "\u07ff"},
		{"u0800", "\u0800"},
		{"uffff", "\uffff"},
		{"u10000", "\U00010000"},
		{"u10ffff", "\U0010ffff"},
		{"emoji", "😀👍🏽"},
		{"bom", "\ufeffbom"},
	}
	for _, v := range valid {
		add("6.valid."+v.name, closing(one(txt(v.s)))...)
	}
	greek := []byte("κόσμε")
	add("6.valid.greek-one-byte-fragments", closing(one(fragments(ws.OpText, greek, len(greek))...))...)
	add("6.valid.split-inside-code-point", closing(one(frag(false, ws.OpText, greek[:3]), frag(true, ws.OpContinuation, greek[3:])))...)
	add("6.valid.greek-chopped", closing(chopped(1, txtB(greek)))...)

	invalid := []struct{ name, s string }{
		{"ff", "\xff"},
		{"fe", "\xfe"},
		{"lone-continuation", "\x80"},
		{"overlong-slash", "\xc0\xaf"},
		{"overlong-3-byte", "\xe0\x80\xaf"},
		{"surrogate", "\xed\xa0\x80"},
		{"above-10ffff", "\xf4\x90\x80\x80"},
		{"5-byte", "\xf8\x88\x80\x80\x80"},
		{"truncated", "\xce\xba\xe1\xbd"},
		{"inside-valid", "κόσμε\xed\xa0\x80edited"},
	}
	for _, v := range invalid {
		add("6.invalid."+v.name, closing(one(txt(v.s)))...)
	}
	add("6.invalid.across-fragments", closing(one(frag(false, ws.OpText, []byte("κό")), frag(true, ws.OpContinuation, []byte("\xed\xa0\x80"))))...)
	add("6.invalid.first-fragment", closing(one(frag(false, ws.OpText, []byte("\xff")), frag(true, ws.OpContinuation, []byte("ok"))))...)
	return cs
}

// closeCases: section 7.
func closeCases(cs []confCase) []confCase {
	add := func(name string, writes ...confWrite) {
		cs = append(cs, confCase{name: name, writes: writes})
	}
	add("7.close.empty", one(closeRaw(nil)))
	add("7.close.1000-no-reason", one(closeW(1000, "")))
	add("7.close.1000-with-reason", one(closeW(1000, "bye")))
	add("7.close.1000-123-byte-reason", one(closeW(1000, string(pat(123, 1)))))
	add("7.close.1000-multibyte-reason", one(closeW(1000, "κόσμε 😀")))
	add("7.close.chopped", chopped(1, closeW(1000, "chopped")))
	add("7.close.123-byte-reason-in-64bit", one(frameSpec{Fin: true, Op: ws.OpClose, Payload: closePayload(1000, string(pat(123, 3))), LenBytes: 8}.wire()))
	for _, code := range []ws.StatusCode{1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999} {
		add(fmt.Sprintf("7.close.code-%d", code), one(closeW(code, "")))
	}
	for _, code := range []ws.StatusCode{0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535} {
		add(fmt.Sprintf("7.close.invalid-code-%d", code), one(closeW(code, "")))
	}
	add("7.close.1-byte-payload", one(closeRaw([]byte{0x03})))
	add("7.close.reason-invalid-utf8", one(closeRaw(append(closePayload(1000, ""), "bad \xff"...))))
	add("7.close.reason-truncated-utf8", one(closeRaw(append(closePayload(1000, ""), "\xce\xba\xe1\xbd"...))))
	add("7.close.reason-surrogate", one(closeRaw(append(closePayload(1000, ""), "\xed\xa0\x80"...))))
	long := closeRaw(append(closePayload(1000, ""), pat(124, 2)...))
	long.close = false
	add("7.close.payload-126", one(long))
	add("7.close.then-text", one(closeW(1000, ""), txt("after close")))
	add("7.close.then-close", one(closeW(1000, "first"), closeW(1001, "second")))
	add("7.close.text-then-close", one(txt("last words"), closeW(1000, "")))
	ms := make([]wire, 10)
	for i := range ms {
		ms[i] = bin(bytesPat(100*i, byte(i)))
	}
	add("7.close.after-10-messages", one(append(ms, closeW(1001, "leaving"))...))
	add("7.close.separate-write-after-message", one(txt("message")), one(closeW(1000, "")))
	return cs
}

// limitCases: 9-lite, against confLimit on both paths. Each case runs
// with sluice's frame and message limits and the reference's read limit.
func limitCases(cs []confCase) []confCase {
	add := func(name string, writes ...confWrite) {
		cs = append(cs, confCase{name: name, writes: writes, limited: true})
	}
	for _, d := range dataOps {
		add("9.limit."+d.name+"-at-limit", closing(one(frag(true, d.op, d.body(confLimit, 1))))...)
		add("9.limit."+d.name+"-over-limit", one(frag(true, d.op, d.body(confLimit+1, 2))))
		add("9.limit."+d.name+"-fragments-at-limit", closing(one(fragments(d.op, d.body(confLimit, 3), 2)...))...)
		add("9.limit."+d.name+"-fragments-over-limit",
			one(frag(false, d.op, d.body(confLimit/2, 4)), frag(true, ws.OpContinuation, d.body(confLimit/2+1, 5))))
	}
	add("9.limit.one-byte-fragments-at-limit", closing(one(fragments(ws.OpBinary, bytesPat(confLimit, 6), confLimit)...))...)
	add("9.limit.one-byte-fragments-over-limit", one(fragments(ws.OpBinary, bytesPat(confLimit+1, 7), confLimit+1)...))
	add("9.limit.16bit-length-over-limit", one(bin(bytesPat(3000, 8))))
	add("9.limit.ping-125-is-not-data", closing(one(ping(pat(125, 9))))...)
	ms := make([]wire, 5)
	for i := range ms {
		ms[i] = bin(bytesPat(confLimit, byte(i)))
	}
	add("9.limit.five-messages-at-limit", closing(one(ms...))...)
	add("9.limit.valid-then-over-limit", one(txt("small"), bin(bytesPat(confLimit+1, 10))))
	return cs
}
