package demo

import (
	"bytes"
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sluice-proxy/sluice/config"
)

// TestDemoRuns runs the demo once per policy, the way a newcomer would but
// shorter, and checks the summary tells each policy's story.
//
// The phase without sluice is skipped (TestDemoFlood covers it); the
// flooder runs at its default rate, as in a newcomer's run.
//
// -rate=200 compresses time: at the default 50 messages/s the kernel's
// buffers and sluice's 100-message queue hold about 4.5 s of a frozen
// client's feed, longer than a 4 s run, so no policy would act yet.
//
// The slow-ratio guard is switched off: it is not what this test is about,
// and on a loaded machine under -race enough fast clients fall 5 messages
// (25 ms at 200/s) behind at once for it to evict the slow clients before
// their policy acts.
func TestDemoRuns(t *testing.T) {
	defer goleak.VerifyNone(t)
	fastRE := regexp.MustCompile(`fast clients: (\d+) received ([\d,]+) messages, ([\d,]+) gaps`)
	slowRE := regexp.MustCompile(`slow clients received ([\d,]+) messages, ([\d,]+) lost`)
	droppedRE := regexp.MustCompile(`dropped ([\d,]+) messages`)
	num := func(s string) uint64 {
		n, err := strconv.ParseUint(strings.ReplaceAll(s, ",", ""), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for _, policy := range []string{"evict", "drop", "pause"} {
		t.Run(policy, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var stdout, stderr bytes.Buffer
			began := time.Now()
			err := Run(ctx, []string{"-duration=4s", "-plain", "-clients=40", "-slow=0.1", "-direct=false",
				"-admin=127.0.0.1:0", "-rate=200", "-policy=" + policy},
				map[string]string{config.Prefix + "SLOW_CLIENT_MAX_RATIO": "1"}, &stdout, &stderr)
			out := stdout.String()
			t.Logf("took %s\n%s%s", time.Since(began).Round(time.Millisecond), out, stderr.String())
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			if !strings.Contains(out, "--- summary: ") || !strings.Contains(out, "through sluice, policy "+policy+",") || !strings.Contains(out, "status page: http://127.0.0.1:") {
				t.Fatal("no status page line or summary in the output")
			}
			// One a second, but a starved machine may delay some.
			if !strings.Contains(out, "\n  1s ") && !strings.Contains(out, "\n  2s ") {
				t.Error("no progress line")
			}
			m := fastRE.FindStringSubmatch(out)
			if m == nil {
				t.Fatal("no fast-client line in the summary")
			}
			if m[1] != "36" || num(m[2]) == 0 {
				t.Errorf("fast clients: %s received %s; want 36 receiving messages", m[1], m[2])
			}
			s := slowRE.FindStringSubmatch(out)
			if s == nil {
				t.Fatal("no slow-client line in the summary")
			}
			switch policy {
			case "evict":
				if num(m[3]) != 0 {
					t.Errorf("fast clients saw %s gaps under evict; want 0", m[3])
				}
				if !strings.Contains(out, "slow clients: 4 closed with 1013 Try Again Later") {
					t.Error("slow clients were not all closed with 1013")
				}
			case "drop":
				if d := droppedRE.FindStringSubmatch(out); d == nil || num(d[1]) == 0 || num(s[2]) == 0 {
					t.Errorf("drop: dropped %v, slow clients lost %s; want both above 0", d, s[2])
				}
			case "pause":
				if num(s[2]) != 0 || num(s[1]) == 0 {
					t.Errorf("pause: slow clients received %s and lost %s; want all, none lost", s[1], s[2])
				}
			}
		})
	}
}

// TestDemoFlood runs both phases with a flooder and checks what a user
// would: without sluice the flooder's messages reach the backend far above
// the limit and the backend's queue climbs; through sluice the flooder is
// held near the limit while the other clients still get their messages.
func TestDemoFlood(t *testing.T) {
	defer goleak.VerifyNone(t)
	const (
		flood    = 1000
		limit    = demoClientLimit
		duration = 4 * time.Second
	)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	began := time.Now()
	err := Run(ctx, []string{"-duration=" + duration.String(), "-plain", "-clients=40", "-slow=0.1",
		"-admin=127.0.0.1:0", "-rate=200", "-flood=" + strconv.Itoa(flood)},
		map[string]string{config.Prefix + "SLOW_CLIENT_MAX_RATIO": "1"}, &stdout, &stderr)
	out := stdout.String()
	t.Logf("took %s\n%s%s", time.Since(began).Round(time.Millisecond), out, stderr.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	num := func(s string) float64 {
		n, err := strconv.ParseFloat(strings.ReplaceAll(s, ",", ""), 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for _, want := range []string{"1. without sluice", "2. through sluice", "clients may send 50 messages/s (throttle)",
		"without sluice              through sluice", "backend queued at the end", "Without sluice, the backend queued"} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in the output", want)
		}
	}
	m := regexp.MustCompile(`flooder at the backend\s+([\d,]+) messages/s\s+([\d,]+) messages/s`).FindStringSubmatch(out)
	if m == nil {
		t.Fatal("no flooder row in the comparison")
	}
	direct, via := num(m[1]), num(m[2])
	if direct < 5*limit {
		t.Errorf("without sluice the flooder reached the backend at %v/s; want far above the limit of %d/s", direct, limit)
	}
	// Loose, for a noisy machine: the limit with room, plus the burst
	// (one second's worth) spread over a phase that may have run short.
	if bound := 1.5*limit + limit/(duration.Seconds()-1); via > bound || via == 0 {
		t.Errorf("through sluice the flooder reached the backend at %v/s; want above 0 and at most %.0f/s", via, bound)
	}
	f := regexp.MustCompile(`flooder: sent ([\d,]+) messages/s, reached the backend at ([\d,]+)/s \(limit 50/s, throttled\); other clients unaffected`).FindStringSubmatch(out)
	if f == nil {
		t.Fatal("no flooder line in the summary, or other clients were affected")
	}
	if sent := num(f[1]); sent < 2*via {
		t.Errorf("the flooder sent %v/s through sluice; want well above what reached the backend (%v/s)", sent, via)
	}
	fast := regexp.MustCompile(`fast clients: 36 received ([\d,]+) messages, 0 gaps`).FindStringSubmatch(out)
	if fast == nil || num(fast[1]) == 0 {
		t.Error("the fast clients did not all get their messages through sluice")
	}
	if !strings.Contains(out, " throttled=1 ") {
		t.Error("the status page never showed the flooder throttled")
	}
}

func TestDemoFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-policy=fast"}, `-policy=fast: want evict, drop or pause`},
		{[]string{"-slow=1.5"}, `-slow=1.5: want a share from 0 to 1`},
		{[]string{"-clients=0"}, `-clients=0: want a whole number from 1 to 10000`},
		{[]string{"-duration=10ms"}, `-duration=10ms: want a duration from 1s to 1h`},
		{[]string{"-rate=0"}, `-rate=0: want messages per second from 1 to 10000`},
		{[]string{"-size=8"}, `-size=8: want bytes from 16`},
		{[]string{"-admin=nowhere"}, `-admin=nowhere: want a host:port`},
		{[]string{"-rate=10000", "-size=1048576"}, `want at most 1.00 GiB/s in total`},
		{[]string{"-clients=x"}, `invalid value "x" for flag -clients`},
		{[]string{"-nope"}, `flag provided but not defined: -nope`},
		{[]string{"extra"}, `unexpected argument "extra"`},
		{[]string{"-flood=-3"}, `want messages per second from 0 (no flooder) to 1000000, or max`},
		{[]string{"-flood", "200"}, `a rate goes with =, such as -flood=200`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := Run(context.Background(), tc.args, nil, &stdout, &stderr)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v; want one containing %q", err, tc.want)
			}
		})
	}
	t.Run("every problem at once", func(t *testing.T) {
		err := Run(context.Background(), []string{"-policy=x", "-clients=0"}, nil, &bytes.Buffer{}, &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), "-policy=x") || !strings.Contains(err.Error(), "-clients=0") {
			t.Errorf("error %v; want both problems", err)
		}
	})
	t.Run("bad environment", func(t *testing.T) {
		err := Run(context.Background(), nil, map[string]string{"SLUICE_QUEUE_MAX_MESAGES": "5"}, &bytes.Buffer{}, &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), "did you mean SLUICE_QUEUE_MAX_MESSAGES") {
			t.Errorf("error %v; want the config error", err)
		}
	})
	t.Run("help", func(t *testing.T) {
		var stderr bytes.Buffer
		if err := Run(context.Background(), []string{"-h"}, nil, &bytes.Buffer{}, &stderr); err != nil {
			t.Errorf("-h: %v", err)
		}
		if !strings.Contains(stderr.String(), "-policy") {
			t.Errorf("-h printed %q; want the flags", stderr.String())
		}
	})
}

// TestMain fails the run if a client, backend or sluice goroutine outlives
// the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
