package main

import (
	"bytes"
	"context"
	"runtime/debug"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if run leaves a goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestCheck: `sluice check` fails with exactly the error a start with the
// same environment fails with, and on a good one prints the warnings and
// "configuration ok" without opening a socket.
func TestCheck(t *testing.T) {
	bad := map[string]string{
		"SLUICE_UPSTREAM_URL":       "ftp://backend",
		"SLUICE_QUEUE_MAX_MESAGES":  "5",
		"SLUICE_QUEUE_MAX_MESSAGES": "0",
	}
	checkErr := run(context.Background(), []string{"check"}, bad, &bytes.Buffer{}, &bytes.Buffer{})
	startErr := run(context.Background(), nil, bad, &bytes.Buffer{}, &bytes.Buffer{})
	if checkErr == nil || startErr == nil || checkErr.Error() != startErr.Error() {
		t.Fatalf("check: %v\nstart: %v\nwant the same error from both", checkErr, startErr)
	}
	for _, want := range []string{"SLUICE_UPSTREAM_URL=", "did you mean SLUICE_QUEUE_MAX_MESSAGES?", `SLUICE_QUEUE_MAX_MESSAGES="0"`} {
		if !strings.Contains(checkErr.Error(), want) {
			t.Errorf("check error lacks %q:\n%s", want, checkErr)
		}
	}

	var out bytes.Buffer
	good := map[string]string{
		"SLUICE_UPSTREAM_URL":  "ws://backend:8080/socket",
		"SLUICE_LISTEN_ADDR":   "203.0.113.1:1", // not ours: check must not bind it
		"SLUICE_PING_INTERVAL": "0",
	}
	if err := run(context.Background(), []string{"check"}, good, &out, &bytes.Buffer{}); err != nil {
		t.Fatalf("check of a good environment: %v", err)
	}
	if got := out.String(); !strings.Contains(got, "warning: SLUICE_PING_INTERVAL=0") || !strings.HasSuffix(got, "sluice: configuration ok\n") {
		t.Errorf("check printed %q; want the keepalive warning and configuration ok", got)
	}
	if err := run(context.Background(), []string{"check", "extra"}, good, &out, &bytes.Buffer{}); err == nil {
		t.Error("check accepted an argument")
	}
}

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"version"}, nil, &out, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "sluice ") || !strings.Contains(out.String(), " go1.") {
		t.Errorf("version printed %q", out.String())
	}
	for _, tc := range []struct {
		bi   debug.BuildInfo
		want string
	}{
		{debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v1.2.0"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "0123abcd"}, {Key: "vcs.time", Value: "2026-12-01T10:00:00Z"}, {Key: "vcs.modified", Value: "true"},
		}}, "sluice v1.2.0 commit 0123abcd (2026-12-01T10:00:00Z, modified) go1.26.8"},
		{debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}}, "sluice (devel) commit unknown go1.26.8"},
	} {
		if got := versionLine(&tc.bi); got != tc.want {
			t.Errorf("versionLine = %q, want %q", got, tc.want)
		}
	}
}

func TestUnknownCommand(t *testing.T) {
	err := run(context.Background(), []string{"chek"}, nil, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), `unknown command "chek"`) || !strings.Contains(err.Error(), "sluice check") {
		t.Errorf("error %v; want the unknown command and the usage", err)
	}
}

// TestDemoCommand: `sluice demo` reaches the demo's flags.
func TestDemoCommand(t *testing.T) {
	err := run(context.Background(), []string{"demo", "-clients=0"}, nil, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "-clients=0: want") {
		t.Errorf("error %v; want the demo's flag check", err)
	}
}
