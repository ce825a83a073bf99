package proxy

import (
	"net/http"
	"strings"
	"testing"

	"github.com/sluice-proxy/sluice/internal/wstest"
)

// TestLogsRedactQuery: no log line carries a query value of the client's
// URL, neither "session open" nor "upstream dial failed", unless
// LogQuery; the keys stay.
func TestLogsRedactQuery(t *testing.T) {
	checkLeaks(t)
	const secret = "s3cr3t-t0ken"
	for _, logQuery := range []bool{false, true} {
		b := newEchoBackend(t)
		p := startTestProxy(t, b, Options{LogQuery: logQuery})
		c := mustUpgrade2(t, p, "/chat?token="+secret+"&room=7")
		c.echo(t, "hello")
		c.bye()
		waitSessions(t, p.Server, 0)
		b.CloseListener()
		if _, res, _ := wstest.Upgrade(t, p.addr, wstest.Request{Path: "/chat?token=" + secret}); res.StatusCode != http.StatusBadGateway {
			t.Fatalf("with the backend gone: %s, want 502", res.Status)
		}
		logs := p.logs.String()
		for _, msg := range []string{"session open", "upstream dial failed"} {
			if p.logs.Count(msg) == 0 {
				t.Fatalf("no %q line:\n%s", msg, logs)
			}
		}
		if got := strings.Contains(logs, secret); got != logQuery {
			t.Errorf("LogQuery %v: the token in the logs: %v\n%s", logQuery, got, logs)
		}
		if !logQuery && p.logs.Count(`/chat?token=REDACTED&room=REDACTED`, "session open") != 1 {
			t.Errorf("session open does not show the path and keys:\n%s", logs)
		}
	}
}

// mustUpgrade2 upgrades through p at path and wants a 101.
func mustUpgrade2(t *testing.T, p *testProxy, path string) *wsClient {
	t.Helper()
	c, res, body := wstest.Upgrade(t, p.addr, wstest.Request{Path: path})
	if c == nil {
		t.Fatalf("upgrade: %s %q", res.Status, body)
	}
	return &wsClient{Conn: c.Conn, br: c.BR}
}
