// Package version names the build of sluice that is running: the version
// and commit stamped at build time, else what the go command recorded.
//
// A build script stamps them with the linker, so a build from a tree
// without .git (the Docker build's context excludes it) still knows them:
//
//	go build -ldflags "-X $(go list -m)/version.version=v1.2.0 -X $(go list -m)/version.commit=0123abcd" .
//
// build.sh and deploy/Dockerfile do this.
package version

import (
	"runtime"
	"runtime/debug"
)

// version and commit are set only by the linker (-X), never at run time:
// they are constants whose value the build chooses, hence variables.
var (
	version string
	commit  string
)

// Info is what names a build.
type Info struct {
	Version   string // "v1.2.0", a git describe, or "(devel)"; never empty
	Commit    string // the VCS revision, with "-modified" for a dirty tree; "unknown" when nobody recorded it
	GoVersion string // the Go toolchain that built the binary, "go1.26.8"
}

// Get returns the stamped version and commit, falling back to the go
// command's build information for each one the build did not stamp.
func Get() Info {
	bi, _ := debug.ReadBuildInfo()
	return resolve(version, commit, bi)
}

// resolve is Get with its inputs given, for the tests: the stamped values
// win; bi (nil when the binary has none) fills the gaps.
func resolve(stampedVersion, stampedCommit string, bi *debug.BuildInfo) Info {
	info := Info{Version: stampedVersion, Commit: stampedCommit, GoVersion: runtime.Version()}
	if bi != nil {
		info.GoVersion = bi.GoVersion
		if info.Version == "" {
			info.Version = bi.Main.Version
		}
		if info.Commit == "" {
			info.Commit = vcsCommit(bi.Settings)
		}
	}
	if info.Version == "" {
		info.Version = "(devel)"
	}
	if info.Commit == "" {
		info.Commit = "unknown"
	}
	return info
}

// vcsCommit is the go command's vcs.revision, marked "-modified" when the
// tree had uncommitted changes, as git describe --dirty marks it.
func vcsCommit(settings []debug.BuildSetting) string {
	var rev, modified string
	for _, s := range settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if rev != "" && modified == "true" {
		rev += "-modified"
	}
	return rev
}

// String renders the line `sluice version` prints:
// "sluice v1.2.0 commit 0123abcd go1.26.8".
func (i Info) String() string {
	return "sluice " + i.Version + " commit " + i.Commit + " " + i.GoVersion
}
