package admin

import (
	"fmt"
	"testing"

	"github.com/sluice-proxy/sluice/proxy"
)

func TestTopSessions(t *testing.T) {
	s := func(id uint64, bytes int64, msgs int) proxy.SessionInfo {
		return proxy.SessionInfo{ID: id, QueueBytes: bytes, QueueMessages: msgs}
	}
	ids := func(in []proxy.SessionInfo) []uint64 {
		var out []uint64
		for _, x := range in {
			out = append(out, x.ID)
		}
		return out
	}
	for _, tc := range []struct {
		name string
		in   []proxy.SessionInfo
		k    int
		want []uint64
	}{
		{"empty", nil, 3, nil},
		{"fewer than k", []proxy.SessionInfo{s(1, 10, 1), s(2, 30, 3)}, 3, []uint64{2, 1}},
		{"keeps the deepest", []proxy.SessionInfo{s(1, 10, 1), s(2, 50, 5), s(3, 0, 0), s(4, 40, 4), s(5, 20, 2)}, 3, []uint64{2, 4, 5}},
		{"ties: messages, then id", []proxy.SessionInfo{s(3, 10, 1), s(1, 10, 1), s(2, 10, 2)}, 2, []uint64{2, 1}},
		{"k zero", []proxy.SessionInfo{s(1, 10, 1)}, 0, nil},
		{"toward the backend counts", []proxy.SessionInfo{s(1, 10, 1), {ID: 2, UpstreamBytes: 30}, s(3, 20, 2)}, 2, []uint64{2, 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := ids(topSessions(tc.in, tc.k))
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("topSessions = %v, want %v", got, tc.want)
			}
		})
	}
}

func BenchmarkTopSessions(b *testing.B) {
	all := make([]proxy.SessionInfo, 50_000)
	for i := range all {
		all[i] = proxy.SessionInfo{ID: uint64(i), QueueBytes: int64(i*7919) % 100_000, QueueMessages: i % 100}
	}
	b.ReportAllocs()
	for b.Loop() {
		topSessions(all, statusTopN)
	}
}

func TestStatusHistoryRing(t *testing.T) {
	p := &StatusPage{}
	for i := range statusHistoryLen + 5 {
		p.record(Sample{T: int64(i)})
	}
	h := p.history()
	if len(h) != statusHistoryLen || h[0].T != 5 || h[len(h)-1].T != statusHistoryLen+4 {
		t.Fatalf("history: %d samples from %d to %d; want %d from 5 to %d",
			len(h), h[0].T, h[len(h)-1].T, statusHistoryLen, statusHistoryLen+4)
	}
}
