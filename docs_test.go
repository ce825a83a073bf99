package main

import (
	"bufio"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode"

	"github.com/caarlos0/env/v11"

	"github.com/sluice-proxy/sluice/config"
)

// perfLink is a link from the README into PERFORMANCE.md. When its text
// holds a number it is a quoted figure, and its anchor names the section
// whose tables the figure comes from.
var perfLink = regexp.MustCompile(`\[([^\]]+)\]\(PERFORMANCE\.md(?:#([^)]*))?\)`)

// figure is a number or a range as the documents write them: 3657,
// 3,657, 0.76, 4.0, 0.76–0.87. A range is one figure: its ends are not
// checked apart, so 0.76–0.87 does not match a row with 0.76 and 0.80–0.87.
var figure = regexp.MustCompile(`\d[\d,]*(?:\.\d+)?(?:–\d[\d,]*(?:\.\d+)?)?`)

// measured is how the README writes what only a measurement gives: a
// ratio (0.76×, 1.37–1.59×) or a fractional size (4.0 KiB, 2.4 MiB);
// settings are whole sizes (64 KiB). Every one is a figure from
// PERFORMANCE.md.
var measured = regexp.MustCompile(`\d\.\d+(?:–\d\.\d+)?(?:×| [KMG]iB)`)

// TestReadmeFiguresMatchPerformance: every figure the README quotes from
// PERFORMANCE.md is written as a link to the section it comes from, and
// the numbers in the link's text must be in one row of that section's
// tables (both ends of a range in the same row). A figure changed on one
// side only, or a section renamed, fails here.
func TestReadmeFiguresMatchPerformance(t *testing.T) {
	readme := readDoc(t, "README.md")
	sections := markdownSections(readDoc(t, "PERFORMANCE.md"))

	quoted := map[string][]string{} // anchor -> link texts
	for _, m := range perfLink.FindAllStringSubmatch(readme, -1) {
		text, anchor := m[1], m[2]
		nums := figure.FindAllString(text, -1)
		if anchor == "" {
			if len(nums) > 0 {
				t.Errorf("README quotes %q from PERFORMANCE.md without naming the section (PERFORMANCE.md#anchor)", text)
			}
			continue
		}
		sec, ok := sections[anchor]
		if !ok {
			t.Errorf("README links to PERFORMANCE.md#%s; PERFORMANCE.md has no such heading", anchor)
			continue
		}
		if len(nums) == 0 {
			continue // the section's name, not a figure
		}
		inRow := func(row map[string]bool) bool {
			return !slices.ContainsFunc(nums, func(n string) bool { return !row[normalFigure(n)] })
		}
		if !slices.ContainsFunc(tableRows(sec), inRow) {
			t.Errorf("README quotes %q from PERFORMANCE.md#%s, but no row of that section's tables holds %s", text, anchor, strings.Join(nums, " and "))
		}
		quoted[anchor] = append(quoted[anchor], text)
	}

	// A measured figure typed in as plain text is one nothing checks.
	unlinked := perfLink.ReplaceAllString(readme, "")
	for _, r := range measured.FindAllString(unlinked, -1) {
		t.Errorf("README states %s without quoting it from PERFORMANCE.md: write [%s](PERFORMANCE.md#section)", r, r)
	}

	// The figures a reader decides on must stay quoted this way, not
	// typed in as plain text where nothing checks them.
	for _, want := range []struct{ what, anchor, suffix string }{
		{"broadcast CPU against HAProxy's", "cpu-and-latency-against-haproxy", "×"},
		{"idle memory per proxied connection", "against-haproxy-and-nginx", "KiB"},
		{"upgrades per second against HAProxy's", "where-the-targets-stand", "×"},
		{"upgrades per second", "handshakes", ""},
	} {
		if !slices.ContainsFunc(quoted[want.anchor], func(text string) bool { return strings.HasSuffix(text, want.suffix) }) {
			t.Errorf("README quotes no figure for %s from PERFORMANCE.md#%s (ending in %q); quoted there: %q", want.what, want.anchor, want.suffix, quoted[want.anchor])
		}
	}
}

// TestReadmeCodeMapListsEveryPackage: the README's code map names every
// package directory of the module, each at the start of a line, and no
// directory that is gone.
func TestReadmeCodeMapListsEveryPackage(t *testing.T) {
	readme := readDoc(t, "README.md")
	start := strings.Index(readme, "### Code map\n")
	if start < 0 {
		t.Fatal("README.md has no \"### Code map\" section")
	}
	block := fencedBlock(readme[start:])
	named := map[string]bool{}
	for _, line := range strings.Split(block, "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasSuffix(f[0], "/") {
			named[strings.TrimSuffix(f[0], "/")] = true
		}
	}
	var packages []string
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != "." && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".go") && filepath.Dir(path) != "." {
			if dir := filepath.ToSlash(filepath.Dir(path)); !slices.Contains(packages, dir) {
				packages = append(packages, dir)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range packages {
		if !named[p] {
			t.Errorf("the README's code map does not name %s/", p)
		}
	}
	for dir := range named {
		if !slices.Contains(packages, dir) {
			t.Errorf("the README's code map names %s/, which holds no Go package", dir)
		}
	}
}

// TestReadmeSidecarMatchesManifest: the sidecar snippet in "In front of
// your backend" says what deploy/kubernetes.yaml says (ports, probes,
// environment), its ports are sluice's defaults, every variable it and
// the first section name exists, and its environment is one sluice
// starts with.
func TestReadmeSidecarMatchesManifest(t *testing.T) {
	readme := readDoc(t, "README.md")
	manifest := readDoc(t, "deploy/kubernetes.yaml")
	start := strings.Index(readme, "## In front of your backend\n")
	if start < 0 {
		t.Fatal("README.md has no \"## In front of your backend\" section")
	}
	section := readme[start:]
	if end := strings.Index(section[1:], "\n## "); end >= 0 {
		section = section[:end+1]
	}
	yamlAt := strings.Index(section, "```yaml\n")
	if yamlAt < 0 {
		t.Fatal("\"In front of your backend\" has no yaml block")
	}
	snippet := fencedBlock(section[yamlAt:])

	// Each {name: N, key: value} of the snippet is, in the manifest, a
	// "- name: N" with "key: value" on the next line.
	pair := regexp.MustCompile(`\{name: ([^,]+), (\w+): ([^}]+)\}`)
	pairs := pair.FindAllStringSubmatch(snippet, -1)
	if len(pairs) < 5 {
		t.Fatalf("the sidecar snippet has %d name/value entries; want its ports and environment:\n%s", len(pairs), snippet)
	}
	sidecarEnv := map[string]string{}
	for _, m := range pairs {
		name, key, value := m[1], m[2], unquote(m[3])
		want := regexp.MustCompile(`- name: ` + regexp.QuoteMeta(name) + `\n\s+` + key + `: "?` + regexp.QuoteMeta(value) + `"?\n`)
		if !want.MatchString(manifest) {
			t.Errorf("the README's sidecar has {name: %s, %s: %s}; deploy/kubernetes.yaml does not", name, key, value)
		}
		if strings.HasPrefix(name, config.Prefix) {
			sidecarEnv[name] = value
		}
	}
	for _, probe := range []string{"livenessProbe", "readinessProbe"} {
		m := regexp.MustCompile(probe + `: \{httpGet: \{path: (\S+), port: (\w+)\}`).FindStringSubmatch(snippet)
		if m == nil {
			t.Errorf("the sidecar snippet has no %s with an httpGet", probe)
			continue
		}
		want := regexp.MustCompile(probe + `:\n\s+httpGet:\n\s+path: ` + regexp.QuoteMeta(m[1]) + `\n\s+port: ` + m[2] + `\n`)
		if !want.MatchString(manifest) {
			t.Errorf("the README's %s gets %s on port %s; deploy/kubernetes.yaml's does not", probe, m[1], m[2])
		}
	}

	// The container ports are the defaults of the listen and admin
	// addresses, which the snippet does not set.
	params, err := env.GetFieldParamsWithOptions(&config.Config{}, env.Options{Prefix: config.Prefix})
	if err != nil {
		t.Fatal(err)
	}
	defaults := map[string]string{}
	for _, p := range params {
		defaults[p.Key] = p.DefaultValue
	}
	for port, variable := range map[string]string{"ws": "SLUICE_LISTEN_ADDR", "admin": "SLUICE_ADMIN_ADDR"} {
		m := regexp.MustCompile(`\{name: ` + port + `, containerPort: (\d+)\}`).FindStringSubmatch(snippet)
		if m == nil || ":"+m[1] != defaults[variable] {
			t.Errorf("the sidecar's %s port is %v; %s defaults to %q", port, m, variable, defaults[variable])
		}
	}
	for _, name := range regexp.MustCompile(`SLUICE_[A-Z_]+`).FindAllString(section, -1) {
		if _, ok := defaults[name]; !ok {
			t.Errorf("\"In front of your backend\" names %s, which is no variable of config.Config", name)
		}
	}
	if _, err := config.Load(sidecarEnv); err != nil {
		t.Errorf("sluice would not start with the sidecar's environment %v: %v", sidecarEnv, err)
	}
}

// markdownSections maps the anchor of each heading (as GitHub makes it) to
// the text from the heading to the next heading of its level or above.
func markdownSections(doc string) map[string]string {
	type heading struct {
		level  int
		anchor string
		at     int
	}
	var hs []heading
	fenced := false
	at := 0
	sc := bufio.NewScanner(strings.NewReader(doc))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
		}
		if level := len(line) - len(strings.TrimLeft(line, "#")); !fenced && level > 0 && strings.HasPrefix(line[level:], " ") {
			hs = append(hs, heading{level, anchor(line[level+1:]), at})
		}
		at += len(line) + 1
	}
	out := map[string]string{}
	for i, h := range hs {
		end := len(doc)
		for _, next := range hs[i+1:] {
			if next.level <= h.level {
				end = next.at
				break
			}
		}
		out[h.anchor] = doc[h.at:end]
	}
	return out
}

// anchor is GitHub's: lower case, punctuation dropped, spaces as hyphens.
func anchor(title string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(title)) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// tableRows is, for each table row of a section outside code blocks, the
// set of numbers in it.
func tableRows(section string) []map[string]bool {
	var out []map[string]bool
	fenced := false
	for _, line := range strings.Split(section, "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
		}
		if fenced || !strings.HasPrefix(line, "|") {
			continue
		}
		row := map[string]bool{}
		for _, n := range figure.FindAllString(line, -1) {
			row[normalFigure(n)] = true
		}
		out = append(out, row)
	}
	return out
}

// normalFigure drops thousands separators: 3,657 and 3657 are one figure.
func normalFigure(n string) string {
	return strings.ReplaceAll(n, ",", "")
}

// fencedBlock is the body of the first ``` block in text.
func fencedBlock(text string) string {
	open := strings.Index(text, "```")
	if open < 0 {
		return ""
	}
	body := text[open:]
	body = body[strings.Index(body, "\n")+1:]
	if end := strings.Index(body, "```"); end >= 0 {
		body = body[:end]
	}
	return body
}

func unquote(s string) string {
	return strings.Trim(strings.TrimSpace(s), `"`)
}

func readDoc(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
