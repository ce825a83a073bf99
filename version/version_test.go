package version

import (
	"runtime/debug"
	"testing"
)

func TestResolve(t *testing.T) {
	vcs := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v1.1.0"}, Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: "feedbeef"}, {Key: "vcs.modified", Value: "true"},
	}}
	noVCS := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}}
	tests := []struct {
		name            string
		version, commit string
		bi              *debug.BuildInfo
		want            string
	}{
		{"stamped wins", "v1.2.0", "0123abcd", vcs, "sluice v1.2.0 commit 0123abcd go1.26.8"},
		{"the go command's record", "", "", vcs, "sluice v1.1.0 commit feedbeef-modified go1.26.8"},
		{"a tree without .git, not stamped", "", "", noVCS, "sluice (devel) commit unknown go1.26.8"},
		{"a tree without .git, stamped", "v1.2.0", "0123abcd", noVCS, "sluice v1.2.0 commit 0123abcd go1.26.8"},
		{"only the version stamped", "v1.2.0", "", vcs, "sluice v1.2.0 commit feedbeef-modified go1.26.8"},
	}
	for _, tt := range tests {
		if got := resolve(tt.version, tt.commit, tt.bi).String(); got != tt.want {
			t.Errorf("%s: %q, want %q", tt.name, got, tt.want)
		}
	}
	if got := resolve("", "", nil); got.Version != "(devel)" || got.Commit != "unknown" || got.GoVersion == "" {
		t.Errorf("no build information: %+v", got)
	}
}
