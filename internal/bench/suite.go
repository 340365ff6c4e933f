package bench

import "strings"

// The function suite `vhive bench coldstart --suite` measures: the REAP
// paper's functions as Python images (functions/python, built by `make
// images`; localhost/vhive/py-<name>) on the Linux sandboxes (gvisor, runc, microvm), and their Go twins
// (functions/<name>, built for Linux and wasm) on every sandbox. docs/functions.md
// describes them; functions/python's tests check these lists against the
// function directories.
var (
	// SuitePythonCI is the CI set of functions/python (make images).
	SuitePythonCI = []string{"helloworld", "chameleon", "pyaes", "image-rotate", "json-serdes", "lr-serving", "lr-training"}
	// SuitePythonFull adds the functions only make images-full builds.
	SuitePythonFull = []string{"cnn-serving", "rnn-serving", "video-processing"}
	// SuiteGoTwins are the Go functions doing the same work (aes ≈ pyaes).
	SuiteGoTwins = []string{"helloworld", "chameleon", "aes", "image-rotate", "json-serdes", "lr-serving"}
)

// PythonPrefix starts the bench name (and image name) of a Python function.
const PythonPrefix = "py-"

// SuiteFunctions is the bench's function list for a suite: "ci" or "full".
func SuiteFunctions(set string) ([]string, bool) {
	var py []string
	switch set {
	case "ci":
		py = SuitePythonCI
	case "full":
		py = append(append([]string{}, SuitePythonCI...), SuitePythonFull...)
	default:
		return nil, false
	}
	var out []string
	for _, f := range py {
		out = append(out, PythonPrefix+f)
	}
	return append(out, SuiteGoTwins...), true
}

// SuiteSkip leaves out the Python functions on wasm (a CPython image is not
// a wasm module).
func SuiteSkip(function, sandbox string) bool {
	return sandbox == "wasm" && strings.HasPrefix(function, PythonPrefix)
}
