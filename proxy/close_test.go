package proxy

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/gobwas/ws"
)

// The README's table of causes says, for each, what code each side gets
// and when; it must say what endings does.
func TestEndingsMatchREADME(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	start := strings.Index(text, "| cause | client gets | upstream gets |")
	if start < 0 {
		t.Fatal("README.md has no table of causes")
	}
	rows := strings.Split(text[start:], "\n")[2:]
	label := regexp.MustCompile("`([^`]+)`")
	documented := map[string]bool{}
	for _, row := range rows {
		if !strings.HasPrefix(row, "|") {
			break
		}
		cols := strings.Split(row, "|")
		if len(cols) < 4 {
			t.Fatalf("row %q has too few columns", row)
		}
		for _, m := range label.FindAllStringSubmatch(cols[1], -1) {
			c, ok := causeLabeled(m[1])
			if !ok {
				continue // a setting named in the text
			}
			documented[m[1]] = true
			e := endings[c]
			checkLegDoc(t, m[1], "client", e.client, cols[2])
			checkLegDoc(t, m[1], "upstream", e.upstream, cols[3])
		}
	}
	for c := causeNone + 1; c < numCauses; c++ {
		if !documented[endings[c].label] {
			t.Errorf("cause %q is not in the README's table", endings[c].label)
		}
	}
}

func causeLabeled(label string) (cause, bool) {
	for c := causeNone + 1; c < numCauses; c++ {
		if endings[c].label == label {
			return c, true
		}
	}
	return causeNone, false
}

var firstCode = regexp.MustCompile(`\b(1\d{3})\b`)

func checkLegDoc(t *testing.T, label, leg string, le legEnd, doc string) {
	t.Helper()
	doc = strings.TrimSpace(doc)
	if le.order == noClose {
		if doc != "—" {
			t.Errorf("%s: the %s gets no close, README says %q", label, leg, doc)
		}
		return
	}
	want := le.code
	switch want {
	case codeUpstreamFailure:
		want = 1014 // the default of Options.UpstreamFailureCode
	case codeOfViolation:
		want = ws.StatusProtocolError
	}
	m := firstCode.FindStringSubmatch(doc)
	if m == nil || m[1] != strconv.Itoa(int(want)) {
		t.Errorf("%s: the %s gets %d, README says %q", label, leg, want, doc)
	}
	when := map[closeOrder]string{afterData: "after its queued data", aheadOfData: "at once", afterUpstream: "until it answers"}[le.order]
	if !strings.Contains(doc, when) {
		t.Errorf("%s: the %s's close goes %q, README says %q", label, leg, when, doc)
	}
}
