package integration

// End-to-end tests of the real sluice binary: configured by SLUICE_*
// variables only, drained by SIGTERM, observed through its admin listener.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
	gorilla "github.com/gorilla/websocket"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

var (
	procBuildOnce sync.Once
	procBin       string // path of the built binary, set by procBuildOnce
	procBuildErr  error
)

// procBinary builds sluice once per test binary run and returns its path.
// The binary is left in a temporary directory: with no TestMain of our own
// there is no hook after the last test to remove it.
func procBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the sluice binary; skipped with -short")
	}
	procBuildOnce.Do(func() {
		root, err := filepath.Abs("..")
		if err != nil {
			procBuildErr = err
			return
		}
		if mod, err := os.ReadFile(filepath.Join(root, "go.mod")); err != nil || !bytes.HasPrefix(mod, []byte("module github.com/sluice-proxy/sluice\n")) {
			procBuildErr = fmt.Errorf("%s is not the sluice module root (go.mod: %v)", root, err)
			return
		}
		dir, err := os.MkdirTemp("", "sluice-proc-test-")
		if err != nil {
			procBuildErr = err
			return
		}
		bin := filepath.Join(dir, "sluice")
		cmd := exec.Command("go", "build", "-o", bin, ".")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			procBuildErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		procBin = bin
	})
	if procBuildErr != nil {
		t.Fatal(procBuildErr)
	}
	return procBin
}

// procLog collects the process's stderr, one JSON log line per entry, and
// picks the listening addresses out of it.
type procLog struct {
	mu        sync.Mutex
	partial   []byte   // guarded by mu
	lines     []string // guarded by mu
	addr      string   // guarded by mu
	adminAddr string   // guarded by mu
	listening chan struct{}
}

func (l *procLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		line := string(l.partial[:i])
		l.partial = l.partial[i+1:]
		l.lines = append(l.lines, line)
		if l.addr != "" {
			continue
		}
		var e struct {
			Message   string `json:"message"`
			Addr      string `json:"addr"`
			AdminAddr string `json:"admin_addr"`
		}
		if json.Unmarshal([]byte(line), &e) == nil && e.Message == "listening" && e.Addr != "" {
			l.addr, l.adminAddr = e.Addr, e.AdminAddr
			close(l.listening)
		}
	}
	return len(p), nil
}

// text is everything written so far, the unterminated tail included.
func (l *procLog) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n") + "\n" + string(l.partial)
}

// has reports whether a complete line contains every one of subs.
func (l *procLog) has(subs ...string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
next:
	for _, line := range l.lines {
		for _, s := range subs {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		return true
	}
	return false
}

// procSluice is one running sluice process.
type procSluice struct {
	cmd       *exec.Cmd
	log       *procLog
	exited    chan struct{} // closed once Wait has returned
	waitErr   error         // set before exited is closed
	Addr      string        // proxy listener, once listening
	AdminAddr string        // admin listener, once listening
}

// procStart runs the binary with a minimal environment plus env (SLUICE_*
// variables; the listen addresses default to 127.0.0.1:0, the shutdown
// timeout to 10s and the drain delay to 0). The cleanup kills it if it still runs and waits for it.
func procStart(t *testing.T, env map[string]string) *procSluice {
	t.Helper()
	bin := procBinary(t)
	vars := map[string]string{
		"SLUICE_LISTEN_ADDR":      "127.0.0.1:0",
		"SLUICE_ADMIN_ADDR":       "127.0.0.1:0",
		"SLUICE_SHUTDOWN_TIMEOUT": "10s",
		"SLUICE_DRAIN_DELAY":      "0", // the drain tests expect new clients refused at once
	}
	for k, v := range env {
		vars[k] = v
	}
	environ := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range vars {
		environ = append(environ, k+"="+v)
	}
	p := &procSluice{log: &procLog{listening: make(chan struct{})}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin)
	p.cmd.Env = environ
	p.cmd.Stdout = io.Discard
	p.cmd.Stderr = p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start sluice: %v", err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("sluice stderr:\n%s", p.log.text())
		}
	})
	return p
}

// procStartListening is procStart followed by a wait for the listening line.
func procStartListening(t *testing.T, env map[string]string) *procSluice {
	t.Helper()
	p := procStart(t, env)
	select {
	case <-p.log.listening:
	case <-p.exited:
		t.Fatalf("sluice exited before listening: %v\n%s", p.waitErr, p.log.text())
	case <-time.After(10 * time.Second):
		t.Fatalf("sluice did not log \"listening\" within 10s\n%s", p.log.text())
	}
	p.log.mu.Lock()
	p.Addr, p.AdminAddr = p.log.addr, p.log.adminAddr
	p.log.mu.Unlock()
	if p.AdminAddr == "" {
		t.Fatalf("listening line has no admin_addr\n%s", p.log.text())
	}
	return p
}

// exitCode waits up to d for the process to end and returns its exit code.
func (p *procSluice) exitCode(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(d):
		t.Fatalf("sluice still running %v later", d)
	}
	if p.waitErr == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(p.waitErr, &ee) {
		return ee.ExitCode()
	}
	t.Fatalf("wait: %v", p.waitErr)
	return -1
}

// procGet fetches an admin URL without keeping the connection: an idle
// keep-alive connection would outlive the test as goroutines.
func procGet(addr, path string) (int, string, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := http.Client{Transport: tr, Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// TestProcSIGTERMDrain: SIGTERM with 100 live sessions and one client that
// never answers the close. sluice stops accepting, reports not-ready, sends
// 1001 to every client and every upstream leg, waits for the laggard up to
// its close timeout, and exits 0 within the shutdown timeout.
func TestProcSIGTERMDrain(t *testing.T) {
	const sessions = 100
	be := kaStartBackend(t, nil)
	p := procStartListening(t, map[string]string{
		"SLUICE_UPSTREAM_URL":  be.URL,
		"SLUICE_CLOSE_TIMEOUT": "2s",
	})
	proxyURL := "ws://" + p.Addr

	if code, body, err := procGet(p.AdminAddr, "/readyz"); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz before SIGTERM = %d %q %v, want 200", code, body, err)
	}

	type result struct {
		i   int
		err error
	}
	results := make(chan result, sessions)
	d := gorilla.Dialer{HandshakeTimeout: wstest.IOTimeout}
	for i := range sessions {
		c, _, err := d.Dial(fmt.Sprintf("%s/s%d", proxyURL, i), nil)
		if err != nil {
			t.Fatalf("client %d dial: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
		msg := fmt.Sprintf("hello %d", i)
		c.SetReadDeadline(time.Now().Add(wstest.IOTimeout))
		if err := c.WriteMessage(gorilla.TextMessage, []byte(msg)); err != nil {
			t.Fatalf("client %d write: %v", i, err)
		}
		if _, got, err := c.ReadMessage(); err != nil || string(got) != msg {
			t.Fatalf("client %d echo = %q, %v; want %q", i, got, err, msg)
		}
		c.SetReadDeadline(time.Now().Add(15 * time.Second))
		go func() {
			for {
				if _, _, err := c.ReadMessage(); err != nil {
					results <- result{i, err}
					return
				}
			}
		}()
	}

	// The laggard echoes once, then never reads again: its session stays
	// in the close handshake until SLUICE_CLOSE_TIMEOUT, so the drain
	// lasts long enough to be observed.
	lag, lagBuf, _, err := ws.Dialer{Timeout: wstest.IOTimeout}.Dial(t.Context(), proxyURL+"/laggard")
	if err != nil {
		t.Fatalf("laggard dial: %v", err)
	}
	t.Cleanup(func() { lag.Close() })
	lagR := kaReader(lag, lagBuf)
	if err := wsutil.WriteClientText(lag, []byte("laggard")); err != nil {
		t.Fatalf("laggard write: %v", err)
	}
	frames, err := wstest.ReadFrames(lag, lagR, 1, kaMaxFrame)
	if err != nil || frames[0].Op != ws.OpText || string(frames[0].Payload) != "laggard" {
		t.Fatalf("laggard echo = %+v, %v", frames, err)
	}

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	sigAt := time.Now()

	// During the drain: not ready, and no new clients.
	readyDeadline := time.Now().Add(time.Second)
	for {
		code, body, err := procGet(p.AdminAddr, "/readyz")
		if err == nil && code == http.StatusServiceUnavailable {
			break
		}
		if time.Now().After(readyDeadline) {
			t.Fatalf("/readyz during the drain = %d %q %v, want 503", code, body, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if c, resp, err := d.Dial(proxyURL+"/late", nil); err == nil {
		c.Close()
		t.Errorf("a new client was accepted during the drain (status %d)", resp.StatusCode)
	}

	for range sessions {
		r := recv(t, results, "a client to be closed")
		var ce *gorilla.CloseError
		if !errors.As(r.err, &ce) || ce.Code != gorilla.CloseGoingAway {
			t.Errorf("client %d read ended with %v, want close 1001", r.i, r.err)
		}
	}
	// Every upstream leg, the laggard's included, is told 1001.
	for i := range sessions + 1 {
		if end := recv(t, be.Ends, fmt.Sprintf("upstream leg %d of %d to end", i+1, sessions+1)); end.Code != int(ws.StatusGoingAway) {
			t.Errorf("upstream leg ended with %v, want 1001", end)
		}
	}

	if code := p.exitCode(t, 10*time.Second); code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	took := time.Since(sigAt)
	if took < time.Second {
		t.Errorf("exited %v after SIGTERM, before the laggard's close timeout (2s): the drain did not wait for it", took)
	}
	if !p.log.has(`"message":"stopped"`) {
		t.Errorf("no \"stopped\" line in the log")
	}

	// The laggard's socket holds sluice's 1001, then the end of the stream.
	frames, err = wstest.ReadFrames(lag, lagR, -1, kaMaxFrame)
	if err != nil {
		t.Fatalf("laggard after the drain: %v (frames %d)", err, len(frames))
	}
	if code, reason := wstest.CloseOf(frames[len(frames)-1]); code != ws.StatusGoingAway {
		t.Errorf("laggard close = %d %q, want 1001", code, reason)
	}
}

// TestProcBadConfig: a bad configuration makes sluice exit 1 before it
// listens, naming every bad variable, its value and what is allowed.
func TestProcBadConfig(t *testing.T) {
	p := procStart(t, map[string]string{
		"SLUICE_UPSTREAM_URL":    "ws://127.0.0.1:1/",
		"SLUICE_POLICY":          "bogus",
		"SLUICE_QUEUE_MAX_BYTES": "lots",
	})
	if code := p.exitCode(t, 10*time.Second); code != 1 {
		t.Errorf("exit code = %d, want 1", code)
	}
	out := p.log.text()
	if strings.Contains(out, `"listening"`) {
		t.Errorf("sluice listened despite a bad configuration:\n%s", out)
	}
	checks := []struct {
		name  string
		value string
		forms []string
	}{
		{"SLUICE_POLICY", "bogus", []string{"evict", "drop", "pause"}},
		{"SLUICE_QUEUE_MAX_BYTES", "lots", []string{"KiB"}},
	}
	for _, c := range checks {
		var line string
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, c.name) {
				line = l
				break
			}
		}
		if line == "" {
			t.Errorf("stderr does not name %s:\n%s", c.name, out)
			continue
		}
		if !strings.Contains(line, c.value) {
			t.Errorf("%s line does not show the value %q: %s", c.name, c.value, line)
		}
		for _, f := range c.forms {
			if !strings.Contains(line, f) {
				t.Errorf("%s line does not give the allowed form (%q missing): %s", c.name, f, line)
			}
		}
	}
}

// TestProcCheck: `sluice check` exits 1 with the stderr a failed start
// prints, and 0 on a good environment; `sluice version` names the build.
func TestProcCheck(t *testing.T) {
	bin := procBinary(t)
	runBin := func(env map[string]string, args ...string) (code int, stdout, stderr string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Fatalf("%v did not exit", args)
		}
		return cmd.ProcessState.ExitCode(), out.String(), errOut.String()
	}
	bad := map[string]string{
		"SLUICE_UPSTREAM_URL":    "ws://127.0.0.1:1/",
		"SLUICE_POLICY":          "bogus",
		"SLUICE_QUEUE_MAX_BYTES": "lots",
		"SLUICE_LISTEN_ADDR":     "127.0.0.1:0",
	}
	code, _, checkErr := runBin(bad, "check")
	if code != 1 {
		t.Errorf("check of a bad environment: exit %d, want 1", code)
	}
	_, _, startErr := runBin(bad)
	if checkErr != startErr || !strings.Contains(checkErr, `SLUICE_POLICY="bogus"`) {
		t.Errorf("check printed\n%s\na failed start printed\n%s\nwant the same, naming SLUICE_POLICY", checkErr, startErr)
	}
	if code, out, errOut := runBin(map[string]string{"SLUICE_UPSTREAM_URL": "ws://127.0.0.1:1/"}, "check"); code != 0 || !strings.Contains(out, "configuration ok") {
		t.Errorf("check of a good environment: exit %d, stdout %q, stderr %q; want 0 and configuration ok", code, out, errOut)
	}
	if code, out, _ := runBin(nil, "version"); code != 0 || !strings.HasPrefix(out, "sluice ") || !strings.Contains(out, " go1.") {
		t.Errorf("version: exit %d, %q", code, out)
	}
}

// TestProcAdminEndpoints: /healthz, /metrics and /readyz, with a live
// upstream and with one whose port is closed.
func TestProcAdminEndpoints(t *testing.T) {
	t.Run("live upstream", func(t *testing.T) {
		be := kaStartBackend(t, nil)
		p := procStartListening(t, map[string]string{"SLUICE_UPSTREAM_URL": be.URL})
		if code, body, err := procGet(p.AdminAddr, "/healthz"); err != nil || code != http.StatusOK {
			t.Errorf("/healthz = %d %q %v, want 200", code, body, err)
		}
		code, body, err := procGet(p.AdminAddr, "/metrics")
		if err != nil || code != http.StatusOK {
			t.Fatalf("/metrics = %d %v, want 200", code, err)
		}
		for _, name := range []string{"sluice_connections_active", "go_goroutines"} {
			if !strings.Contains(body, "\n"+name+" ") {
				t.Errorf("/metrics has no %s sample", name)
			}
		}
		if code, body, err := procGet(p.AdminAddr, "/readyz"); err != nil || code != http.StatusOK {
			t.Errorf("/readyz with a live upstream = %d %q %v, want 200", code, body, err)
		}
	})

	t.Run("upstream down", func(t *testing.T) {
		closed := kaClosedPort(t)
		p := procStartListening(t, map[string]string{"SLUICE_UPSTREAM_URL": "ws://" + closed + "/"})
		if code, body, err := procGet(p.AdminAddr, "/healthz"); err != nil || code != http.StatusOK {
			t.Errorf("/healthz with the upstream down = %d %q %v, want 200 (liveness does not depend on the upstream)", code, body, err)
		}
		if code, body, err := procGet(p.AdminAddr, "/readyz"); err != nil || code != http.StatusServiceUnavailable {
			t.Errorf("/readyz with the upstream down = %d %q %v, want 503", code, body, err)
		}
	})
}
