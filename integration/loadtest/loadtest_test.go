//go:build linux

package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/latency"
)

// TestMain lets the test binary serve as the backend process, which the
// harness starts by re-executing itself with the backend subcommand.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == backendCommand {
		os.Exit(backendMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}

func TestParseTargets(t *testing.T) {
	tests := []struct {
		in      string
		labels  []string
		env     [][]string
		wantErr bool
	}{
		{in: "direct,sluice", labels: []string{"direct", "sluice"}, env: [][]string{nil, nil}},
		{in: "sluice:SLUICE_POLICY=drop", labels: []string{"sluice:SLUICE_POLICY=drop"}, env: [][]string{{"SLUICE_POLICY=drop"}}},
		{
			in:     "sluice:SLUICE_PING_INTERVAL=0,sluice:SLUICE_PING_INTERVAL=1s;SLUICE_PONG_TIMEOUT=500ms",
			labels: []string{"sluice:SLUICE_PING_INTERVAL=0", "sluice:SLUICE_PING_INTERVAL=1s;SLUICE_PONG_TIMEOUT=500ms"},
			env:    [][]string{{"SLUICE_PING_INTERVAL=0"}, {"SLUICE_PING_INTERVAL=1s", "SLUICE_PONG_TIMEOUT=500ms"}},
		},
		{ // a comma inside a target continues it
			in:     "sluice:SLUICE_PING_INTERVAL=1s,SLUICE_PONG_TIMEOUT=500ms,direct",
			labels: []string{"sluice:SLUICE_PING_INTERVAL=1s,SLUICE_PONG_TIMEOUT=500ms", "direct"},
			env:    [][]string{{"SLUICE_PING_INTERVAL=1s", "SLUICE_PONG_TIMEOUT=500ms"}, nil},
		},
		{in: "cmd:echo a,b,direct", labels: []string{"cmd:echo a,b", "direct"}, env: [][]string{nil, nil}},
		{in: "nginx", wantErr: true},
		{in: "sluice:POLICY=drop", wantErr: true},
		{in: "sluice:SLUICE_UPSTREAM_URL=ws://x", wantErr: true},
		{in: "cmd:", wantErr: true},
		{in: "", wantErr: true},
	}
	for _, tt := range tests {
		got, err := parseTargets(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("parseTargets(%q): error %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		for i, s := range got {
			if i >= len(tt.labels) || s.label != tt.labels[i] || !slices.Equal(s.env, tt.env[i]) {
				t.Errorf("parseTargets(%q)[%d] = %q %q, want %q", tt.in, i, s.label, s.env, tt.labels)
			}
		}
		if err == nil && len(got) != len(tt.labels) {
			t.Errorf("parseTargets(%q): %d targets, want %d", tt.in, len(got), len(tt.labels))
		}
	}
}

func TestHistogram(t *testing.T) {
	var h latency.Histogram
	for i := 1; i <= 1000; i++ {
		h.Record(time.Duration(i) * time.Millisecond)
	}
	for _, c := range []struct{ q, want float64 }{{0.5, 500}, {0.99, 990}, {1, 1000}} {
		if got := float64(quantileMs(&h, c.q)); math.Abs(got-c.want)/c.want > 0.04 {
			t.Errorf("quantile %v = %v ms, want %v ms within 4%%", c.q, got, c.want)
		}
	}
	if got := float64(maxMs(&h)); got != 1000 {
		t.Errorf("max = %v ms, want 1000", got)
	}
}

// TestBroadcastDirectAndSluice runs broadcast mode against the backend
// itself and against the sluice binary, 10 clients (one slow) for 2 s each.
func TestBroadcastDirectAndSluice(t *testing.T) {
	if testing.Short() {
		t.Skip("builds sluice and runs processes for several seconds; skipped with -short")
	}
	args := []string{"-mode", "broadcast", "-compare", "direct,sluice", "-clients", "10", "-slow", "0.1", "-duration", "2s", "-close-wait", "1s"}
	cfg, err := parseFlags(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	r := &runner{cfg: cfg, stdout: io.Discard, stderr: &stderr}
	if r.noFile, err = raiseNoFile(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if r.sluiceBin, err = buildSluice(ctx, t.TempDir()); err != nil {
		t.Fatal(err)
	}
	res, err := runAll(ctx, r, runBroadcast)
	if err != nil {
		t.Fatalf("%v\nstderr:\n%s", err, stderr.String())
	}
	for i, rs := range res {
		if len(rs) != 1 {
			t.Fatalf("target %d: %d results, want 1", i, len(rs))
		}
		x := rs[0]
		t.Logf("%s: %.1f msgs/s per fast client, p50 %.2f ms, p99 %.2f ms, gaps %d, slow %v, target RSS %d, backend RSS %d",
			x.Target, x.FastMsgsPerSec, x.FastP50, x.FastP99, x.FastGaps, x.SlowCloses, x.TargetPeakRSS, x.BackendPeakRSS)
		if x.FastReceived <= 0 || x.FastMsgsPerSec <= 0 {
			t.Errorf("%s: fast clients received %d messages (%.1f/s)", x.Target, x.FastReceived, x.FastMsgsPerSec)
		}
		if math.IsNaN(float64(x.FastP50)) || x.FastP50 < 0 || x.FastP99 < x.FastP50 || x.FastMax < x.FastP99 {
			t.Errorf("%s: latency p50 %v, p99 %v, max %v ms: not ordered", x.Target, x.FastP50, x.FastP99, x.FastMax)
		}
		if x.FastClosed != 0 {
			t.Errorf("%s: %d fast clients were closed: %v", x.Target, x.FastClosed, x.FastCloseCounts)
		}
		slow := 0
		for _, n := range x.SlowCloses {
			slow += n
		}
		if slow != 1 {
			t.Errorf("%s: %d slow client outcomes %v, want 1", x.Target, slow, x.SlowCloses)
		}
		if x.BackendPeakRSS <= 0 || x.Backend.Broadcasts <= 0 {
			t.Errorf("%s: backend peak RSS %d, broadcasts %d", x.Target, x.BackendPeakRSS, x.Backend.Broadcasts)
		}
	}
	if direct := res[0][0]; direct.FastGaps != 0 {
		t.Errorf("direct: %d gaps, want 0", direct.FastGaps)
	}
	if s := res[1][0]; s.TargetPeakRSS <= 0 || s.TargetCPU <= 0 {
		t.Errorf("sluice: peak RSS %d, CPU %v s: want both above 0", s.TargetPeakRSS, s.TargetCPU)
	}

	var out bytes.Buffer
	writeBroadcastReport(&out, r, res)
	for _, row := range []string{"\n| direct | 10 | 1 |", "\n| sluice | 10 | 1 |"} {
		if !strings.Contains(out.String(), row) {
			t.Errorf("report has no row starting %q:\n%s", row, out.String())
		}
	}
}

// TestRunAllRotates: each round starts one target further along, so no
// target always runs first, and every result is filed under its target in
// round order.
func TestRunAllRotates(t *testing.T) {
	specs, err := parseTargets("direct,sluice,cmd:true")
	if err != nil {
		t.Fatal(err)
	}
	r := &runner{cfg: config{targets: specs, repeat: 4, mode: modeHandshakes}, stderr: io.Discard}
	var order []string
	res, err := runAll(context.Background(), r, func(_ context.Context, r *runner, t targetSpec) (string, error) {
		order = append(order, t.label)
		return fmt.Sprintf("%s/%d", t.label, r.round), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	wantOrder := []string{
		"direct", "sluice", "cmd:true",
		"sluice", "cmd:true", "direct",
		"cmd:true", "direct", "sluice",
		"direct", "sluice", "cmd:true",
	}
	if !slices.Equal(order, wantOrder) {
		t.Errorf("run order %q, want %q", order, wantOrder)
	}
	for i, s := range specs {
		want := []string{s.label + "/1", s.label + "/2", s.label + "/3", s.label + "/4"}
		if !slices.Equal(res[i], want) {
			t.Errorf("results for %s: %q, want %q", s.label, res[i], want)
		}
	}
}

func TestProfileNames(t *testing.T) {
	specs, err := parseTargets("direct,sluice,sluice:SLUICE_POLICY=drop,cmd:nginx -c /x.conf," +
		"sluice:SLUICE_PING_INTERVAL=1s;SLUICE_PONG_TIMEOUT=500ms,sluice")
	if err != nil {
		t.Fatal(err)
	}
	profileNames(specs)
	want := []string{"", "sluice", "sluice-sluice_policy-drop", "", "sluice-sluice_ping_interval-1s-sluice_pong_timeout-500ms", "sluice-6"}
	for i, s := range specs {
		if s.profileName != want[i] {
			t.Errorf("%q: profile name %q, want %q", s.label, s.profileName, want[i])
		}
	}
	if got := sanitiseLabel("sluice:SLUICE_ALLOWED_ORIGINS=" + strings.Repeat("https://a.example.com;", 20)); len(got) > maxProfileName {
		t.Errorf("sanitised long label is %d bytes, want at most %d", len(got), maxProfileName)
	}
	for _, w := range []struct {
		window time.Duration
		secs   int
	}{{500 * time.Millisecond, 1}, {time.Second, 1}, {5900 * time.Millisecond, 5}, {20 * time.Second, 20}} {
		if got := profileSeconds(w.window); got != w.secs {
			t.Errorf("profileSeconds(%v) = %d, want %d", w.window, got, w.secs)
		}
	}
}

// TestFetchProfileRefused: a profile the target refuses is an error
// naming the answer, and leaves no file.
func TestFetchProfileRefused(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "Could not enable CPU profiling: cpu profiling already in use", http.StatusInternalServerError)
	}))
	defer srv.Close()
	file := filepath.Join(t.TempDir(), "x.cpu.pprof")
	err := fetchProfile(context.Background(), srv.URL+"/debug/pprof/profile?seconds=1", file)
	if err == nil || !strings.Contains(err.Error(), "500") || !strings.Contains(err.Error(), "already in use") {
		t.Errorf("error %v, want the status and the reason", err)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("%s exists after a refused profile (stat: %v)", file, err)
	}
}

// TestIdleProfiles runs idle mode against the backend itself and sluice
// with -profile: sluice's hold gets a CPU and a heap profile, direct none,
// and the report says where they are.
func TestIdleProfiles(t *testing.T) {
	if testing.Short() {
		t.Skip("builds sluice and runs processes for several seconds; skipped with -short")
	}
	dir := filepath.Join(t.TempDir(), "prof")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	args := []string{"-mode", "idle", "-compare", "direct,sluice", "-clients", "10", "-duration", "1500ms", "-profile", dir}
	if err := run(ctx, args, &stdout, &stderr); err != nil {
		t.Fatalf("%v\nstderr:\n%s", err, stderr.String())
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	want := []string{"idle-sluice-r1.cpu.pprof", "idle-sluice-r1.heap.pprof"}
	if !slices.Equal(names, want) {
		t.Fatalf("%s holds %q, want %q\nstderr:\n%s", dir, names, want, stderr.String())
	}
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			t.Errorf("%s is not a gzipped profile: %v", n, err)
			continue
		}
		if raw, err := io.ReadAll(zr); err != nil || len(raw) == 0 {
			t.Errorf("%s: %d bytes of profile, error %v", n, len(raw), err)
		}
		if !strings.Contains(stderr.String(), filepath.Join(dir, n)) {
			t.Errorf("stderr does not list %s:\n%s", n, stderr.String())
		}
	}
	if !strings.Contains(stdout.String(), "- profiles (-profile)") || strings.Contains(stdout.String(), "not written") {
		t.Errorf("report notes on profiles missing or reporting a failure:\n%s", stdout.String())
	}
}

func TestParseSockstat(t *testing.T) {
	full := "sockets: used 290\n" +
		"TCP: inuse 27 orphan 3 tw 6577 alloc 30 mem 200\n" +
		"UDP: inuse 0 mem 5\n" +
		"UDPLITE: inuse 0\n" +
		"RAW: inuse 0\n" +
		"FRAG: inuse 0 memory 0\n"
	tests := []struct {
		name    string
		in      string
		page    int64
		want    tcpSockstat
		wantErr bool
	}{
		{name: "full", in: full, page: 4096, want: tcpSockstat{InUse: 27, Orphan: 3, TW: 6577, Alloc: 30, Mem: 200 * 4096}},
		{name: "64K pages", in: full, page: 65536, want: tcpSockstat{InUse: 27, Orphan: 3, TW: 6577, Alloc: 30, Mem: 200 * 65536}},
		{name: "TCP line only, no newline", in: "TCP: inuse 1 orphan 0 tw 0 alloc 1 mem 0", page: 4096, want: tcpSockstat{InUse: 1, Alloc: 1}},
		{name: "unknown field ignored", in: "TCP: inuse 2 orphan 1 tw 0 alloc 2 mem 7 future 9\n", page: 4096, want: tcpSockstat{InUse: 2, Orphan: 1, Alloc: 2, Mem: 7 * 4096}},
		{name: "UDP mem not taken", in: "UDP: inuse 0 mem 5\nTCP: inuse 0 orphan 0 tw 0 alloc 0 mem 1\n", page: 4096, want: tcpSockstat{Mem: 4096}},
		{name: "no TCP line", in: "sockets: used 1\nUDP: inuse 0 mem 0\n", page: 4096, wantErr: true},
		{name: "TCP6 is not TCP", in: "TCP6: inuse 1\n", page: 4096, wantErr: true},
		{name: "no mem", in: "TCP: inuse 1 orphan 0 tw 0 alloc 1\n", page: 4096, wantErr: true},
		{name: "no orphan", in: "TCP: inuse 1 tw 0 alloc 1 mem 3\n", page: 4096, wantErr: true},
		{name: "bad number", in: "TCP: inuse 1 orphan x tw 0 alloc 1 mem 3\n", page: 4096, wantErr: true},
		{name: "odd fields", in: "TCP: inuse 1 orphan 0 tw 0 alloc 1 mem\n", page: 4096, wantErr: true},
		{name: "empty", in: "", page: 4096, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSockstat(tt.in, tt.page)
			if (err != nil) != tt.wantErr {
				t.Fatalf("parseSockstat: err %v, want error %v", err, tt.wantErr)
			}
			if err == nil && got != tt.want {
				t.Errorf("parseSockstat = %+v, want %+v", got, tt.want)
			}
		})
	}
	// The live file parses too.
	if _, err := readSockstat(); err != nil {
		t.Errorf("readSockstat: %v", err)
	}
}

func TestTargetFlooders(t *testing.T) {
	tests := []struct {
		in       string
		flooders []int
		env      [][]string
		wantErr  bool
	}{
		{in: "direct,sluice", flooders: []int{-1, -1}, env: [][]string{nil, nil}},
		{in: "direct:flooders=0,sluice:flooders=3", flooders: []int{0, 3}, env: [][]string{nil, nil}},
		{
			in:       "sluice:SLUICE_PING_INTERVAL=0;flooders=0,sluice:SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND=50",
			flooders: []int{0, -1},
			env:      [][]string{{"SLUICE_PING_INTERVAL=0"}, {"SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND=50"}},
		},
		{in: "sluice:flooders=2,SLUICE_POLICY=drop", flooders: []int{2}, env: [][]string{{"SLUICE_POLICY=drop"}}},
		{in: "direct:SLUICE_POLICY=drop", wantErr: true},
		{in: "direct:flooders=1;x=2", wantErr: true},
		{in: "sluice:flooders=-1", wantErr: true},
		{in: "sluice:flooders=many", wantErr: true},
		{in: "sluice:flooders=1001", wantErr: true},
	}
	for _, tt := range tests {
		got, err := parseTargets(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("parseTargets(%q): error %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if err != nil {
			continue
		}
		if len(got) != len(tt.flooders) {
			t.Errorf("parseTargets(%q): %d targets, want %d", tt.in, len(got), len(tt.flooders))
			continue
		}
		for i, s := range got {
			if s.flooders != tt.flooders[i] || !slices.Equal(s.env, tt.env[i]) {
				t.Errorf("parseTargets(%q)[%d]: flooders %d env %q, want %d %q", tt.in, i, s.flooders, s.env, tt.flooders[i], tt.env[i])
			}
		}
	}
	r := &runner{cfg: config{flooders: 1}}
	r.cfg.targets, _ = parseTargets("sluice:flooders=0,sluice,direct:flooders=4")
	if got := []int{r.flooders(r.cfg.targets[0]), r.flooders(r.cfg.targets[1]), r.maxFlooders()}; !slices.Equal(got, []int{0, 1, 4}) {
		t.Errorf("flooders, flooders, maxFlooders = %v, want [0 1 4]", got)
	}
}

func TestParseFlagsInbound(t *testing.T) {
	c, err := parseFlags([]string{"-mode", "inbound"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.clients != 200 || c.rate != 5 || c.size != 64 || c.flooders != 1 || c.window != 1000 || c.work != 200*time.Microsecond {
		t.Errorf("inbound defaults: clients %d rate %v size %d flooders %d window %d work %v", c.clients, c.rate, c.size, c.flooders, c.window, c.work)
	}
	c, err = parseFlags([]string{"-mode", "inbound", "-rate", "50", "-size", "1024", "-flooders", "0", "-work", "1ms"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.rate != 50 || c.size != 1024 || c.flooders != 0 || c.work != time.Millisecond {
		t.Errorf("inbound flags not kept: rate %v size %d flooders %d work %v", c.rate, c.size, c.flooders, c.work)
	}
	if c, _ := parseFlags(nil, io.Discard); c.rate != 50 || c.size != 1024 {
		t.Errorf("broadcast defaults changed: rate %v size %d", c.rate, c.size)
	}
	for _, bad := range [][]string{{"-size", "16"}, {"-window", "0"}, {"-flooders", "-1"}, {"-work", "2s"}, {"-work", "-1ms"}} {
		if _, err := parseFlags(append([]string{"-mode", "inbound"}, bad...), io.Discard); err == nil {
			t.Errorf("inbound %q: no error", bad)
		}
	}
}

func TestSeqCheck(t *testing.T) {
	tests := []struct {
		name           string
		seqs           []uint64
		gaps, disorder int64
	}{
		{"in order", []uint64{1, 2, 3, 4}, 0, 0},
		{"first lost", []uint64{2, 3}, 1, 0},
		{"gap", []uint64{1, 2, 5, 6}, 2, 0},
		{"late one", []uint64{1, 3, 2, 4}, 1, 1},
		{"repeat", []uint64{1, 2, 2, 3}, 0, 1},
		{"none", nil, 0, 0},
	}
	for _, tt := range tests {
		var s seqCheck
		for _, q := range tt.seqs {
			s.see(q)
		}
		if s.gaps != tt.gaps || s.disorder != tt.disorder {
			t.Errorf("%s: gaps %d disorder %d, want %d %d", tt.name, s.gaps, s.disorder, tt.gaps, tt.disorder)
		}
	}
}

func TestShareSpread(t *testing.T) {
	tests := []struct {
		counts         []int64
		median, lo, hi float64
	}{
		{[]int64{75, 75, 75}, 75, 1, 1},
		{[]int64{60, 75, 90}, 75, 0.8, 1.2},
		{[]int64{90, 60, 70, 80}, 75, 0.8, 1.2},
		{[]int64{0, 10}, 5, 0, 2},
	}
	for _, tt := range tests {
		m, lo, hi := shareSpread(tt.counts)
		if m != tt.median || math.Abs(lo-tt.lo) > 1e-9 || math.Abs(hi-tt.hi) > 1e-9 {
			t.Errorf("shareSpread(%v) = %v %v %v, want %v %v %v", tt.counts, m, lo, hi, tt.median, tt.lo, tt.hi)
		}
	}
	for _, counts := range [][]int64{nil, {0, 0, 5}} {
		if _, lo, hi := shareSpread(counts); !math.IsNaN(lo) || !math.IsNaN(hi) {
			t.Errorf("shareSpread(%v): spread %v %v, want NaN", counts, lo, hi)
		}
	}
}

func TestInboundReport(t *testing.T) {
	r := &runner{cfg: config{mode: modeInbound, clients: 200, rate: 5, size: 64, flooders: 1, window: 1000, work: 200 * time.Microsecond, repeat: 3}}
	r.cfg.targets, _ = parseTargets("sluice:flooders=0,sluice:SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND=50")
	row := func(target string, flooders int, flood, p99 float64, lost int64) inboundResult {
		return inboundResult{Target: target, Clients: 200, Flooders: flooders, Duration: 15, BackendPerSec: 1000 + flood,
			FlooderPerSec: flood, NormalPerSec: 1000, ShareMedian: 75, ShareMin: 0.987, ShareMax: 1.013,
			NormalP50: 0.5, NormalP99: millis(p99), NormalMax: 9, FlooderLost: lost, TargetRSSStart: 14 << 20, TargetRSSEnd: 15 << 20,
			TargetCPU: 1, BackendCPU: 3.3, BackendEchoed: 15000, SluiceDelayed: map[string]float64{"client_rate": 1250.4}}
	}
	res := [][]inboundResult{
		{row("sluice:flooders=0", 0, 0, 2, 0), row("sluice:flooders=0", 0, 0, 3, 0), row("sluice:flooders=0", 0, 0, 2.5, 0)},
		{row("t", 1, 49, 3, 0), row("t", 1, 50, 4, 7), row("t", 1, 51, 3.5, 0)},
	}
	res[1][1].FloodEnded = map[string]int{"1008": 1}
	var out bytes.Buffer
	writeInboundReport(&out, r, res)
	for _, want := range []string{
		"| sluice:flooders=0 | 200 | 0 | 1000 | — | 1000 | 0.987–1.013 | 0.50 | 2.50 | 9.00 | 0 | 0 | 0 | 0 | 14.0 → 15.0 | 1.00 | 3.30 | 220 |",
		"| t | 200 | 1 | 1050 | 50.0 | 1000 | 0.987–1.013 | 0.50 | 3.50 | 9.00 | 0 | 0 / 7 / 0 | 0 | 0 / normal —, flooders 1×1008 / 0 |",
		"1250×client_rate |",
		"medians of 3 rounds",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}

// TestInboundDirectAndSluice runs inbound mode against the backend itself
// without a flooder and against sluice throttling its flooder: every
// message comes back, in order, and the flooder reaches the backend far
// less often than unthrottled.
func TestInboundDirectAndSluice(t *testing.T) {
	if testing.Short() {
		t.Skip("builds sluice and runs processes for several seconds; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	args := []string{"-mode", "inbound", "-clients", "6", "-rate", "20", "-window", "20", "-work", "100us", "-duration", "1500ms",
		"-sluice-env", "SLUICE_PING_INTERVAL=0", "-compare", "direct:flooders=0,sluice:SLUICE_CLIENT_MAX_MESSAGES_PER_SECOND=20"}
	cfg, err := parseFlags(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	r := &runner{cfg: cfg, stdout: &stdout, stderr: &stderr}
	if r.noFile, err = raiseNoFile(); err != nil {
		t.Fatal(err)
	}
	if r.sluiceBin, err = buildSluice(ctx, t.TempDir()); err != nil {
		t.Fatal(err)
	}
	res, err := runAll(ctx, r, runInbound)
	if err != nil {
		t.Fatalf("%v\nstderr:\n%s", err, stderr.String())
	}
	for _, rs := range res {
		x := rs[0]
		t.Logf("%s: backend %.0f/s, flooders %.1f/s, normal %.0f/s, share %.2f–%.2f, p99 %v ms, lost %d+%d, drain %.1f s",
			x.Target, x.BackendPerSec, x.FlooderPerSec, x.NormalPerSec, x.ShareMin, x.ShareMax, x.NormalP99, x.NormalLost, x.FlooderLost, x.Drain)
		if x.NormalEchoes <= 0 || x.NormalPerSec <= 0 || math.IsNaN(float64(x.NormalP99)) {
			t.Errorf("%s: %d normal echoes, %.1f/s at the backend, p99 %v", x.Target, x.NormalEchoes, x.NormalPerSec, x.NormalP99)
		}
		if x.NormalLost != 0 || x.FlooderLost != 0 || x.Gaps != 0 || x.Disorder != 0 || len(x.NormalEnded)+len(x.FloodEnded) != 0 {
			t.Errorf("%s: lost %d+%d, gaps %d, disorder %d, ended %v %v", x.Target, x.NormalLost, x.FlooderLost, x.Gaps, x.Disorder, x.NormalEnded, x.FloodEnded)
		}
		if x.WorkIterations <= 0 || x.BackendCPU <= 0 {
			t.Errorf("%s: work iterations %d, backend CPU %v", x.Target, x.WorkIterations, x.BackendCPU)
		}
	}
	if d := res[0][0]; d.Flooders != 0 || d.FlooderSent != 0 {
		t.Errorf("direct:flooders=0 ran %d flooders that sent %d", d.Flooders, d.FlooderSent)
	}
	if s := res[1][0]; s.Flooders != 1 || s.FlooderPerSec <= 0 || s.FlooderPerSec > 40 || s.SluiceDelayed["client_rate"] <= 0 {
		t.Errorf("sluice: %d flooders at %.1f/s at the backend, delayed %v: want 1 held near 20/s", s.Flooders, s.FlooderPerSec, s.SluiceDelayed)
	}
	writeInboundReport(&stdout, r, res)
	if !strings.Contains(stdout.String(), "\n| direct:flooders=0 | 6 | 0 |") {
		t.Errorf("report has no direct row:\n%s", stdout.String())
	}
}

func TestParseSizes(t *testing.T) {
	tests := []struct {
		in      string
		want    []int
		wantErr bool
	}{
		{in: "64,256,1KiB,16KiB,64KiB", want: []int{64, 256, 1024, 16384, 65536}},
		{in: "16, 1 KiB,1MiB,100B", want: []int{16, 1024, 1 << 20, 100}},
		{in: "1536", want: []int{1536}},
		{in: "64KiB,64", want: []int{65536, 64}}, // the order given
		{in: "15", wantErr: true},
		{in: "2MiB", wantErr: true},
		{in: "1025KiB", wantErr: true},
		{in: "0", wantErr: true},
		{in: "-64", wantErr: true},
		{in: "1kb", wantErr: true},
		{in: "1.5KiB", wantErr: true},
		{in: "64,,256", wantErr: true},
		{in: "", wantErr: true},
		{in: "1KiB,1024", wantErr: true}, // the same size twice
	}
	for _, tt := range tests {
		got, err := parseSizes(tt.in)
		if (err != nil) != tt.wantErr || !slices.Equal(got, tt.want) {
			t.Errorf("parseSizes(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestParseFlagsMatrix(t *testing.T) {
	c, err := parseFlags([]string{"-clients", "9000", "-sizes", "64,16KiB", "-total-rate", "10000"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.sizes, []int{64, 16384}) || c.totalRate != 10000 || math.Abs(c.rate-10000.0/9000) > 1e-12 {
		t.Errorf("-sizes 64,16KiB -total-rate 10000 over 9000 clients: sizes %v, total %v, per client %v", c.sizes, c.totalRate, c.rate)
	}
	c, err = parseFlags([]string{"-clients", "200", "-total-rate", "10000"}, io.Discard)
	if err != nil || c.rate != 50 || c.sizes != nil || c.size != 1024 {
		t.Errorf("-total-rate 10000 over 200: rate %v, sizes %v, size %d, error %v; want 50/s, no matrix, -size's default", c.rate, c.sizes, c.size, err)
	}
	// The default client count divides the total too.
	if c, err = parseFlags([]string{"-total-rate", "150"}, io.Discard); err != nil || c.rate != 1.5 {
		t.Errorf("-total-rate 150 over the default 100 clients: rate %v, error %v; want 1.5", c.rate, err)
	}
	// -size and -rate as before.
	c, err = parseFlags([]string{"-size", "2048", "-rate", "20"}, io.Discard)
	if err != nil || c.size != 2048 || c.rate != 20 || c.sizes != nil || c.totalRate != 0 {
		t.Errorf("-size 2048 -rate 20: size %d rate %v sizes %v total %v, error %v", c.size, c.rate, c.sizes, c.totalRate, err)
	}
	for _, bad := range []struct {
		args []string
		says []string // in the error
	}{
		{[]string{"-rate", "5", "-total-rate", "1000"}, []string{"-rate 5 and -total-rate 1000: set one"}},
		{[]string{"-size", "64", "-sizes", "64,128"}, []string{"-size 64 and -sizes", "set one"}},
		{[]string{"-sizes", "64,8"}, []string{`"8"`, "16 to 1048576"}},
		{[]string{"-mode", "idle", "-sizes", "64,128"}, []string{"-sizes: broadcast mode only"}},
		{[]string{"-mode", "inbound", "-total-rate", "100"}, []string{"-total-rate: broadcast mode only"}},
		{[]string{"-total-rate", "0"}, []string{"-total-rate 0 over 100 clients"}},
		{[]string{"-clients", "10", "-total-rate", "200000"}, []string{"up to 10000 per client"}},
		{[]string{"-clients", "9000", "-total-rate", "900", "-duration", "5s"}, []string{"less than one message per client"}},
	} {
		_, err := parseFlags(bad.args, io.Discard)
		if err == nil {
			t.Errorf("%q: no error", bad.args)
			continue
		}
		for _, s := range bad.says {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("%q: error %q does not say %q", bad.args, err, s)
			}
		}
	}
}

// TestRunAllMatrix: with -sizes each round runs every size in the order
// given, the targets rotating within it as without -sizes; every run sees
// its size in r.cfg.size, and its result lands in its cell.
func TestRunAllMatrix(t *testing.T) {
	specs, err := parseTargets("direct,sluice")
	if err != nil {
		t.Fatal(err)
	}
	r := &runner{cfg: config{targets: specs, repeat: 2, mode: modeBroadcast, size: 1024, sizes: []int{64, 16384, 256}}, stderr: io.Discard}
	var order []string
	res, err := runAll(context.Background(), r, func(_ context.Context, r *runner, t targetSpec) (string, error) {
		run := fmt.Sprintf("%d %s/%d", r.cfg.size, t.label, r.round)
		order = append(order, run)
		return run, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	wantOrder := []string{
		"64 direct/1", "64 sluice/1", "16384 direct/1", "16384 sluice/1", "256 direct/1", "256 sluice/1",
		"64 sluice/2", "64 direct/2", "16384 sluice/2", "16384 direct/2", "256 sluice/2", "256 direct/2",
	}
	if !slices.Equal(order, wantOrder) {
		t.Errorf("run order %q, want %q", order, wantOrder)
	}
	if len(res) != 6 {
		t.Fatalf("%d cells, want 6", len(res))
	}
	for i, rs := range res {
		sz, spec := r.cfg.cell(i)
		want := []string{fmt.Sprintf("%d %s/1", sz, spec.label), fmt.Sprintf("%d %s/2", sz, spec.label)}
		if !slices.Equal(rs, want) {
			t.Errorf("cell %d (%d %s): %q, want %q", i, sz, spec.label, rs, want)
		}
	}
	r.profiles = &profiles{dir: "/p"}
	profileNames(r.cfg.targets)
	r.cfg.size, r.round = 16384, 3
	if got := r.profileBase(r.cfg.targets[1]); got != "broadcast-sluice-16KiB-r3" {
		t.Errorf("profile name %q, want broadcast-sluice-16KiB-r3", got)
	}
}

func TestBroadcastMatrixReport(t *testing.T) {
	cfg, err := parseFlags([]string{"-clients", "200", "-sizes", "64,16KiB", "-total-rate", "10000", "-repeat", "2",
		"-compare", "direct,sluice,cmd:haproxy -f h.cfg"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	r := &runner{cfg: cfg}
	row := func(target string, size int, targetCPU float64) broadcastResult {
		return broadcastResult{Target: target, Size: size, Rate: 50, Clients: 200, Slow: 20, Duration: 20, SentPerSec: 50, FastMsgsPerSec: 49.95,
			FastReceived: 180 * 1000, FastP50: 0.4, FastP99: 2, FastMax: 9, TargetCPU: targetCPU, BackendCPU: 1.8, HarnessCPU: 3.6}
	}
	// Cells by size, then target; two rounds each.
	res := [][]broadcastResult{
		{row("direct", 64, 0), row("direct", 64, 0)},
		{row("sluice", 64, 3.6), row("sluice", 64, 3.0)},                             // median 3.3 s: 18.3 µs/msg
		{row("cmd:haproxy -f h.cfg", 64, 2.2), row("cmd:haproxy -f h.cfg", 64, 2.2)}, // 12.2 µs/msg
		{row("direct", 16384, 0), row("direct", 16384, 0)},
		{}, // sluice at 16 KiB never finished
		{row("cmd:haproxy -f h.cfg", 16384, 4.5), row("cmd:haproxy -f h.cfg", 16384, 4.5)},
	}
	var out bytes.Buffer
	writeBroadcastReport(&out, r, res)
	report := out.String()
	var rows []string
	for _, l := range strings.Split(report, "\n") {
		if strings.HasPrefix(l, "| ") && !strings.HasPrefix(l, "| size |") {
			rows = append(rows, l)
		}
	}
	// size, target, …, target CPU µs/msg, target CPU vs first proxy, all CPU µs/msg.
	wantPrefix := []string{
		"| 64 B | direct | 200 | 20 | 50.0 |",
		"| 64 B | sluice | 200 | 20 | 50.0 |",
		"| 64 B | cmd:haproxy -f h.cfg | 200 | 20 |",
		"| 16 KiB | direct | 200 | 20 |",
		"| 16 KiB | cmd:haproxy -f h.cfg | 200 | 20 |",
	}
	wantCPU := []string{"| — | — | 30.0 |", "| 18.3 | 1.00× | 48.3 |", "| 12.2 | 0.67× | 42.2 |", "| — | — | 30.0 |", "| 25.0 | 1.00× | 55.0 |"}
	if len(rows) != len(wantPrefix) {
		t.Fatalf("%d rows, want %d:\n%s", len(rows), len(wantPrefix), report)
	}
	for i, l := range rows {
		if !strings.HasPrefix(l, wantPrefix[i]) || !strings.Contains(l, wantCPU[i]) {
			t.Errorf("row %d:\n%s\nwant it to start %q and hold %q", i, l, wantPrefix[i], wantCPU[i])
		}
	}
	for _, want := range []string{
		"| size | target | clients |",
		"| target CPU µs/msg | target CPU vs first proxy | all CPU µs/msg |",
		"messages of 64 B, 16 KiB (a row per size and target) at 10000/s in total (-total-rate), 50/s to every client",
		"medians of 2 rounds per size and target",
		"- size: bytes per message",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}

	// Without -sizes the table is as it was: no size column, no ratio,
	// and the header gives the total beside -rate.
	r.cfg, err = parseFlags([]string{"-clients", "9000", "-rate", "1.5", "-compare", "direct,sluice"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	x := row("sluice", 1024, 1)
	x.Clients, x.SentPerSec, x.FastMsgsPerSec = 9000, 1.5, 1.4994
	writeBroadcastReport(&out, r, [][]broadcastResult{{}, {x}})
	report = out.String()
	for _, want := range []string{
		"1024-byte messages at 1.5/s to every client (13500/s in total)",
		"one run per target",
		"\n| target | clients | slow |",
		"\n| sluice | 9000 | 20 | 1.500 | 1.499 |",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}
	if strings.Contains(report, "vs first") || strings.Contains(report, "- size:") {
		t.Errorf("a report without -sizes has the matrix's column or note:\n%s", report)
	}
	if !strings.Contains(report, "; 20s per run;") {
		t.Errorf("report does not give -duration as the window:\n%s", report)
	}

	// A window rounded to whole broadcast intervals says so.
	r.cfg, err = parseFlags([]string{"-clients", "9000", "-total-rate", "5000", "-duration", "5s", "-target", "direct"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	writeBroadcastReport(&out, r, [][]broadcastResult{{}})
	if want := "at 5000/s in total (-total-rate), 0.5556/s to every client; 5.4s (-duration 5s rounded to whole broadcast intervals of 1.8s) per run;"; !strings.Contains(out.String(), want) {
		t.Errorf("report lacks %q:\n%s", want, out.String())
	}
}

// TestClientPortAtConnect: clients bind their source address without
// taking a port until they connect (IP_BIND_ADDRESS_NO_PORT).
func TestClientPortAtConnect(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, opts := range []socketOpts{{}, {rcvBuf: 4096, mss: 1460}} {
		nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, Timeout: 5 * time.Second, Control: opts.control}
		c, err := nd.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var v int
		var gerr error
		rc.Control(func(fd uintptr) { v, gerr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort) })
		c.Close()
		if gerr != nil || v != 1 {
			t.Errorf("%+v: IP_BIND_ADDRESS_NO_PORT = %d (%v), want 1", opts, v, gerr)
		}
	}
}

// TestBroadcastWindow: the measured window holds whole broadcast
// intervals, so that it holds as many broadcasts wherever it starts.
func TestBroadcastWindow(t *testing.T) {
	tests := []struct {
		d    time.Duration
		rate float64
		want time.Duration
	}{
		{20 * time.Second, 50, 20 * time.Second},
		{20 * time.Second, 10000, 20 * time.Second},
		{5 * time.Second, 5000.0 / 9000, 5400 * time.Millisecond},    // 2.78 intervals of 1.8 s: 3
		{20 * time.Second, 10000.0 / 9000, 19800 * time.Millisecond}, // 22.2 intervals of 0.9 s: 22
		{time.Second, 0.5, 2 * time.Second},                          // at least one interval
		{3 * time.Second, 10000.0 / 200, 3 * time.Second},
		{20 * time.Second, 1.5, 20 * time.Second}, // 30 intervals of 0.667 s
		{20 * time.Second, 10000.0 / 2000, 20 * time.Second},
	}
	for _, tt := range tests {
		got := broadcastWindow(tt.d, tt.rate)
		if got != tt.want {
			t.Errorf("broadcastWindow(%v, %v) = %v, want %v", tt.d, tt.rate, got, tt.want)
		}
	}
}
