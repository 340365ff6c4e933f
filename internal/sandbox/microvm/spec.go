package microvm

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"vhive.dev/vhive/internal/microvm/agentproto"
	"vhive.dev/vhive/internal/sandbox"
)

// startConfig turns spec into the agent's start message (without the
// network, clock and entropy, which are filled in later).
func startConfig(spec sandbox.Spec) (agentproto.Start, error) {
	uid, gid, groups, err := resolveUser(spec.Rootfs, spec.Process.User)
	if err != nil {
		return agentproto.Start{}, fmt.Errorf("microvm: sandbox %q: user %q: %w", spec.ID, spec.Process.User, err)
	}
	return agentproto.Start{
		Args:   spec.Process.Args,
		Env:    buildEnv(spec.Process.Env, spec.Port),
		Cwd:    spec.Process.Cwd,
		UID:    uid,
		GID:    gid,
		Groups: groups,
		Port:   spec.Port,
	}, nil
}

// buildEnv sets GUEST_PORT (replacing any given value) and a default PATH.
func buildEnv(in []string, port int) []string {
	out := make([]string, 0, len(in)+2)
	hasPath := false
	for _, kv := range in {
		if strings.HasPrefix(kv, "GUEST_PORT=") {
			continue
		}
		if strings.HasPrefix(kv, "PATH=") {
			hasPath = true
		}
		out = append(out, kv)
	}
	if !hasPath {
		out = append(out, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return append(out, "GUEST_PORT="+strconv.Itoa(port))
}

// resolveUser turns "" (root), "uid[:gid]" or "name[:group]" into ids,
// looking names up in the image's /etc/passwd and /etc/group; the
// supplementary groups are the user's memberships in /etc/group.
func resolveUser(rootfs, u string) (uint32, uint32, []uint32, error) {
	if u == "" {
		return 0, 0, nil, nil
	}
	user, group, hasGroup := strings.Cut(u, ":")
	passwd := readColonFile(filepath.Join(rootfs, "etc/passwd"))
	groups := readColonFile(filepath.Join(rootfs, "etc/group"))
	var uid, gid uint32
	name := ""
	if n, err := strconv.ParseUint(user, 10, 32); err == nil {
		uid = uint32(n)
		for _, p := range passwd {
			if len(p) > 3 && p[2] == user {
				name = p[0]
				if g, err := strconv.ParseUint(p[3], 10, 32); err == nil {
					gid = uint32(g)
				}
				break
			}
		}
	} else {
		found := false
		for _, p := range passwd {
			if len(p) > 3 && p[0] == user {
				n, err1 := strconv.ParseUint(p[2], 10, 32)
				g, err2 := strconv.ParseUint(p[3], 10, 32)
				if err1 != nil || err2 != nil {
					return 0, 0, nil, fmt.Errorf("bad /etc/passwd entry for %q", user)
				}
				uid, gid, name, found = uint32(n), uint32(g), user, true
				break
			}
		}
		if !found {
			return 0, 0, nil, fmt.Errorf("no user %q in the image's /etc/passwd", user)
		}
	}
	if hasGroup {
		if n, err := strconv.ParseUint(group, 10, 32); err == nil {
			gid = uint32(n)
		} else {
			found := false
			for _, g := range groups {
				if len(g) > 2 && g[0] == group {
					n, err := strconv.ParseUint(g[2], 10, 32)
					if err != nil {
						return 0, 0, nil, fmt.Errorf("bad /etc/group entry for %q", group)
					}
					gid, found = uint32(n), true
					break
				}
			}
			if !found {
				return 0, 0, nil, fmt.Errorf("no group %q in the image's /etc/group", group)
			}
		}
	}
	var extra []uint32
	if name != "" {
		for _, g := range groups {
			if len(g) < 4 {
				continue
			}
			for _, m := range strings.Split(g[3], ",") {
				if m == name {
					if n, err := strconv.ParseUint(g[2], 10, 32); err == nil && uint32(n) != gid {
						extra = append(extra, uint32(n))
					}
				}
			}
		}
	}
	return uid, gid, extra, nil
}

// readColonFile parses an image's passwd or group file; a symlink (which
// would resolve on the host) counts as missing.
func readColonFile(path string) [][]string {
	if fi, err := os.Lstat(path); err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	return out
}
