package integration

// An ordinary Node app (integration/testdata/socketio/server.js) behind
// sluice: Socket.IO with its default transports, SSE, a POST, an 8 MiB
// download and a health check, all on one port, must work through sluice
// as they do direct.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

const socketioDir = "testdata/socketio"

// nodeApp is the Node app, running.
type nodeApp struct {
	addr string // 127.0.0.1:port
}

// needNode skips the test when node or npm is missing, and installs the
// app's packages (package-lock.json, into testdata/socketio/node_modules,
// which git ignores) when they are not there yet.
func needNode(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"node", "npm"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed: the Node app test needs Node.js and npm", tool)
		}
	}
	if _, err := os.Stat(filepath.Join(socketioDir, "node_modules", "socket.io-client")); err == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund")
	cmd.Dir = socketioDir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("npm ci in %s: %v\n%s", socketioDir, err, out)
	}
}

// startNodeApp runs server.js until the test ends.
func startNodeApp(t *testing.T) *nodeApp {
	t.Helper()
	needNode(t)
	cmd := exec.Command("node", "server.js")
	cmd.Dir = socketioDir
	cmd.Stderr = testLog(t)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	type listening struct{ Port int }
	got := make(chan listening, 1)
	go func() {
		var l listening
		json.NewDecoder(out).Decode(&l)
		got <- l
		io.Copy(io.Discard, out) // until the process ends
	}()
	select {
	case l := <-got:
		if l.Port == 0 {
			t.Fatal("server.js did not say which port it listens on")
		}
		return &nodeApp{addr: fmt.Sprintf("127.0.0.1:%d", l.Port)}
	case <-time.After(20 * time.Second):
		t.Fatal("server.js did not start within 20 s")
	}
	return nil
}

// socketioResult is what client.js reports.
type socketioResult struct {
	Error           string
	Hello           string
	FirstTransport  string
	UpgradedTo      string
	Echoes          []string
	ServerTransport string
}

// runSocketIOClient runs client.js against base (http://host:port).
func runSocketIOClient(t *testing.T, base string) socketioResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "client.js", base)
	cmd.Dir = socketioDir
	cmd.Stderr = testLog(t)
	out, err := cmd.Output()
	var r socketioResult
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		t.Fatalf("client.js against %s: %v, output %q (%v)", base, err, out, jerr)
	}
	if err != nil || r.Error != "" {
		t.Fatalf("client.js against %s: %v: %s", base, err, out)
	}
	return r
}

// TestSocketIOThroughSluice: the Socket.IO client starts with long-polling
// (plain requests sluice passes through), upgrades to a WebSocket (an
// upgrade sluice proxies), and sees the same through sluice as direct.
func TestSocketIOThroughSluice(t *testing.T) {
	app := startNodeApp(t)
	s := startSluice(t, "ws://"+app.addr, nil)
	direct := runSocketIOClient(t, "http://"+app.addr)
	through := runSocketIOClient(t, "http://"+s.addr)
	d, _ := json.Marshal(direct)
	th, _ := json.Marshal(through)
	if !bytes.Equal(d, th) {
		t.Errorf("through sluice the client saw\n%s\ndirect\n%s", th, d)
	}
	if through.FirstTransport != "polling" || through.UpgradedTo != "websocket" || through.ServerTransport != "websocket" {
		t.Errorf("through sluice: first transport %q, upgraded to %q, server's transport %q; want polling, then websocket",
			through.FirstTransport, through.UpgradedTo, through.ServerTransport)
	}
	if got := metricValue(t, s, "sluice_http_requests_total", "code", "2xx"); got < 2 {
		t.Errorf("sluice_http_requests_total{code=\"2xx\"} = %v: the long-polls did not go through sluice", got)
	}
	if got := metricValue(t, s, "sluice_connections_accepted_total"); got < 1 {
		t.Errorf("sluice_connections_accepted_total = %v: the upgrade did not go through sluice", got)
	}
}

// TestNodeAppThroughSluice: the Node app's SSE stream, POST echo, 8 MiB
// download and health check, direct and through sluice, and an upgrade on
// a connection that carried a plain request first.
func TestNodeAppThroughSluice(t *testing.T) {
	app := startNodeApp(t)
	s := startSluice(t, "ws://"+app.addr, nil)
	c := plainClient(t)
	for _, base := range []string{"http://" + app.addr, "http://" + s.addr} {
		resp, err := c.Get(base + "/health")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "ok" {
			t.Errorf("%s/health: %d %q", base, resp.StatusCode, b)
		}

		post := bytes.Repeat([]byte("posted through "), 70000) // about 1 MiB
		resp, err = c.Post(base+"/echo", "application/x-test", bytes.NewReader(post))
		if err != nil {
			t.Fatal(err)
		}
		b, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if !bytes.Equal(b, post) {
			t.Errorf("%s/echo: %d bytes back, want the %d sent", base, len(b), len(post))
		}

		resp, err = c.Get(base + "/download")
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		resp.Body.Close()
		want := nodeDownload()
		if err != nil || n != int64(len(want)) || !bytes.Equal(h.Sum(nil), sha256Of(want)) {
			t.Errorf("%s/download: %d bytes (%v), want %d identical bytes", base, n, err, len(want))
		}

		checkNodeSSE(t, c, base)
	}

	// Keep-alive, then an upgrade, on one connection through sluice: the
	// engine.io server's first frame is its open packet.
	r := dialRaw(t, s.addr)
	if code, body := r.get(t, "/health"); code != 200 || body != "ok" {
		t.Fatalf("GET /health: %d %q", code, body)
	}
	r.upgrade(t, nil, "/socket.io/?EIO=4&transport=websocket", "upgrade after a plain request")
	f, err := wstest.ReadFrame(r.br)
	if err != nil || !strings.HasPrefix(string(f.Payload), `0{"sid":`) {
		t.Fatalf("engine.io open packet: %q, %v", f.Payload, err)
	}
}

// nodeDownload is server.js's /download.
func nodeDownload() []byte {
	b := make([]byte, 8<<20+7)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

// checkNodeSSE reads server.js's /sse from base: each event must arrive
// before the app is asked (/sse-next) to send the next one.
func checkNodeSSE(t *testing.T, c *http.Client, base string) {
	t.Helper()
	resp, err := c.Get(base + "/sse")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for i := 1; i <= 3; i++ {
		if i > 1 {
			nr, err := c.Get(base + "/sse-next")
			if err != nil {
				t.Fatal(err)
			}
			nr.Body.Close()
		}
		line, err := br.ReadString('\n')
		if err != nil || line != fmt.Sprintf("data: event %d\n", i) {
			t.Fatalf("%s/sse: event %d: %q, %v", base, i, line, err)
		}
		br.ReadString('\n')
	}
}
