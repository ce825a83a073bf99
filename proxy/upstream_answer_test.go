package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// fakeUpstream answers every upgrade request with answer(key), raw bytes
// written as they are, then holds the connection until the test ends.
func fakeUpstream(t *testing.T, answer func(key string) string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.SetDeadline(time.Now().Add(wstest.IOTimeout))
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				io.WriteString(c, answer(req.Header.Get("Sec-Websocket-Key")))
				io.Copy(io.Discard, c)
			}()
		}
	}()
	return "ws://" + ln.Addr().String() + "/"
}

func switching(key, extra string) string {
	return "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Accept: " + wstest.AcceptKey(key) + "\r\n" + extra + "\r\n"
}

// TestUpstreamAnswerCleaned: what the upstream answers reaches the client
// only clean and bounded: a 101 whose header holds a bare CR or a NUL,
// a refusal past the head bound or malformed, and a 101 after an interim
// answer get 502; a refusal loses the fields its Connection lists, and
// interim 1xx answers are skipped for the final one.
func TestUpstreamAnswerCleaned(t *testing.T) {
	checkLeaks(t)
	huge := "HTTP/1.1 403 Forbidden\r\nX-Huge: " + strings.Repeat("h", 8<<20) + "\r\nContent-Length: 0\r\n\r\n"
	for _, c := range []struct {
		name   string
		answer func(key string) string
		status int
		header http.Header // wanted in the client's answer ("" value: absent)
		body   string
	}{
		{"101 with a bare CR", func(k string) string { return switching(k, "Set-Cookie: a=1\rInjected: x\r\n") }, 502, nil, ""},
		{"101 with a NUL", func(k string) string { return switching(k, "X-Note: a\x00b\r\n") }, 502, nil, ""},
		{"101 with a huge header", func(k string) string { return switching(k, "X-Huge: "+strings.Repeat("h", 1<<20)+"\r\n") }, 502, nil, ""},
		{"refusal with an 8 MiB header", func(string) string { return huge }, 502, http.Header{"X-Huge": {""}}, ""},
		{"refusal with a bare CR", func(string) string {
			return "HTTP/1.1 403 Forbidden\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n"
		}, 502, nil, ""},
		{"refusal lists fields in Connection", func(string) string {
			return "HTTP/1.1 403 Forbidden\r\nConnection: X-Secret, close\r\nX-Secret: s\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nno"
		}, 403, http.Header{"X-Secret": {""}, "X-Kept": {"k"}}, "no"},
		{"interim answers skipped", func(string) string {
			return "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" +
				"HTTP/1.1 403 Forbidden\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nno"
		}, 403, http.Header{"X-Final": {"yes"}, "Link": {""}}, "no"},
		{"101 after an interim answer", func(k string) string { return "HTTP/1.1 100 Continue\r\n\r\n" + switching(k, "") }, 502, nil, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			up := fakeUpstream(t, c.answer)
			p := startLifecycleProxy(t, up, Options{})
			_, res, body := wstest.Upgrade(t, p.addr, wstest.Request{})
			if res.StatusCode != c.status {
				t.Fatalf("status %s, want %d", res.Status, c.status)
			}
			for name, vs := range c.header {
				if got := res.Header.Get(name); got != vs[0] {
					t.Errorf("%s: %q, want %q", name, got, vs[0])
				}
			}
			if c.body != "" && body != c.body {
				t.Errorf("body %q, want %q", body, c.body)
			}
		})
	}
}
