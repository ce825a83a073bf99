package main

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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
	// The host's limits are checked as a start checks them: more
	// connections than any host's ephemeral port range holds.
	out.Reset()
	good["SLUICE_MAX_CONNECTIONS"] = "70000"
	if err := run(context.Background(), []string{"check"}, good, &out, &bytes.Buffer{}); err != nil {
		t.Fatalf("check of a good environment: %v", err)
	}
	if got := out.String(); !strings.Contains(got, "warning: SLUICE_MAX_CONNECTIONS=70000 exceeds the") {
		t.Errorf("check printed %q; want the ephemeral port warning", got)
	}
	if err := run(context.Background(), []string{"check", "extra"}, good, &out, &bytes.Buffer{}); err == nil {
		t.Error("check accepted an argument")
	}
}

// TestVersion: `sluice version`, -version and --version print the same
// line, with the Go release.
func TestVersion(t *testing.T) {
	var first string
	for _, arg := range []string{"version", "-version", "--version"} {
		var out bytes.Buffer
		if err := run(context.Background(), []string{arg}, nil, &out, &bytes.Buffer{}); err != nil {
			t.Fatalf("%s: %v", arg, err)
		}
		if !strings.HasPrefix(out.String(), "sluice ") || !strings.Contains(out.String(), " commit ") || !strings.HasSuffix(out.String(), " "+runtime.Version()+"\n") {
			t.Errorf("%s printed %q", arg, out.String())
		}
		if first == "" {
			first = out.String()
		} else if out.String() != first {
			t.Errorf("%s printed %q, version printed %q", arg, out.String(), first)
		}
	}
	if err := run(context.Background(), []string{"version", "extra"}, nil, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Error("version accepted an argument")
	}
}

// TestVersionStampedWithoutGit builds sluice as the Docker build does,
// from a copy of the tree without .git, through build.sh with the version
// and commit given, and runs the binary's -version: it must name the
// stamped build, not "(devel) commit unknown".
func TestVersionStampedWithoutGit(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command on PATH")
	}
	src := t.TempDir()
	copyTree(t, ".", src)
	bin := filepath.Join(t.TempDir(), "sluice")
	build := exec.Command("sh", "build.sh")
	build.Dir = src
	build.Env = append(os.Environ(), "VERSION=v9.8.7", "COMMIT=0123456789abcdef", "OUT="+bin,
		"PATH="+filepath.Dir(goBin)+string(os.PathListSeparator)+os.Getenv("PATH"), "GOFLAGS=-mod=readonly")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build.sh: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "-version").CombinedOutput()
	if err != nil {
		t.Fatalf("sluice -version: %v\n%s", err, out)
	}
	if want := "sluice v9.8.7 commit 0123456789abcdef " + runtime.Version() + "\n"; string(out) != want {
		t.Errorf("sluice -version printed %q, want %q", out, want)
	}
}

// copyTree copies the regular files under from to to, leaving out .git
// (a directory, or a file in a worktree) as .dockerignore does.
func copyTree(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.WalkDir(from, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Name() == ".git" {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		dst := filepath.Join(to, path)
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
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
