package orchestrator

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

// Frame is one gRPC message as it travels on the wire: serialized, never
// decoded. RawCodec sends and receives Frames as they are.
type Frame []byte

// RawCodec is a gRPC codec that passes *Frame through unchanged and encodes
// anything else as protobuf; its name is "proto", so a relay is invisible
// to both ends.
type RawCodec struct{}

var protoCodec = encoding.GetCodecV2(encproto.Name)

// Marshal returns a *Frame's bytes as they are.
func (RawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if f, ok := v.(*Frame); ok {
		return mem.BufferSlice{mem.SliceBuffer(*f)}, nil
	}
	return protoCodec.Marshal(v)
}

// Unmarshal stores the message's bytes in a *Frame.
func (RawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if f, ok := v.(*Frame); ok {
		*f = data.Materialize()
		return nil
	}
	return protoCodec.Unmarshal(data, v)
}

// Name is "proto": frames are protobuf messages the codec does not decode.
func (RawCodec) Name() string { return encproto.Name }

// NormalizeMethod checks a gRPC method name, "pkg.Service/Method" with or
// without its leading '/', and returns it in the wire form
// "/pkg.Service/Method".
func NormalizeMethod(m string) (string, error) {
	m = strings.TrimPrefix(m, "/")
	svc, meth, ok := strings.Cut(m, "/")
	if !ok || svc == "" || meth == "" || strings.Contains(meth, "/") ||
		strings.ContainsFunc(m, func(r rune) bool { return r < 0x21 || r == 0x7f }) || len(m) > 1024 {
		return "", fmt.Errorf("%w: gRPC method %.80q: want package.Service/Method", ErrInvalid, m)
	}
	return "/" + m, nil
}

// methodCall calls a unary method with the request's serialized bytes (or,
// with asJSON, its protobuf JSON converted by the function's reflection),
// storing the reply's bytes (or JSON) in *reply.
func (f *function) methodCall(method string, payload []byte, asJSON bool, reply *[]byte) (call, error) {
	method, err := NormalizeMethod(method)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, in *instance, _ bool) (metadata.MD, time.Duration, error) {
		var untimed time.Duration
		req := Frame(payload)
		var md protoreflect.MethodDescriptor
		if asJSON {
			t := time.Now()
			var err error
			md, err = f.resolveMethod(ctx, in, method)
			if err != nil {
				return nil, time.Since(t), err
			}
			msg := dynamicpb.NewMessage(md.Input())
			if err := protojson.Unmarshal(payload, msg); err != nil {
				return nil, time.Since(t), fmt.Errorf("%w: request for %s is not a %s in protobuf JSON: %v", ErrInvalid, method, md.Input().FullName(), err)
			}
			if req, err = proto.Marshal(msg); err != nil {
				return nil, time.Since(t), fmt.Errorf("%w: encode request for %s: %v", ErrInvalid, method, err)
			}
			untimed = time.Since(t)
		}
		var hdr metadata.MD
		var out Frame
		if err := in.conn.Invoke(ctx, method, &req, &out, grpc.ForceCodecV2(RawCodec{}), grpc.Header(&hdr)); err != nil {
			return hdr, untimed, err
		}
		*reply = out
		if asJSON {
			msg := dynamicpb.NewMessage(md.Output())
			if err := proto.Unmarshal(out, msg); err != nil {
				return hdr, untimed, fmt.Errorf("%w: function %q: reply of %s is not a %s: %v", ErrFunction, f.spec.Name, method, md.Output().FullName(), err)
			}
			j, err := protojson.Marshal(msg)
			if err != nil {
				return hdr, untimed, err
			}
			*reply = j
		}
		return hdr, untimed, nil
	}, nil
}

// httpCall sends an HTTP request to an HTTP function: GET / by default, POST
// when there is a body; the response's status, headers and body are the
// result, whatever the status (a 500 is the function's answer).
func httpCall(hr *HTTPRequest, body []byte, res *Result) (call, error) {
	method, path := hr.Method, hr.Path
	if method == "" {
		method = http.MethodGet
		if len(body) > 0 {
			method = http.MethodPost
		}
	}
	if path == "" {
		path = "/"
	}
	if !strings.HasPrefix(path, "/") || strings.ContainsFunc(path, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
		return nil, fmt.Errorf("%w: HTTP path %.80q: want an absolute path (and query) without spaces or control characters", ErrInvalid, path)
	}
	if strings.ContainsFunc(method, func(r rune) bool { return r < 'A' || r > 'Z' }) {
		return nil, fmt.Errorf("%w: HTTP method %.20q: want upper-case letters", ErrInvalid, method)
	}
	return func(ctx context.Context, in *instance, _ bool) (metadata.MD, time.Duration, error) {
		u := *in.url
		ref, err := u.Parse(path)
		if err != nil {
			return nil, 0, fmt.Errorf("%w: HTTP path %.80q: %v", ErrInvalid, path, err)
		}
		req, err := http.NewRequestWithContext(ctx, method, ref.String(), bytes.NewReader(body))
		if err != nil {
			return nil, 0, fmt.Errorf("%w: HTTP request: %v", ErrInvalid, err)
		}
		for k, vs := range hr.Header {
			for _, v := range vs {
				req.Header.Add(k, v)
			}
		}
		if len(body) == 0 {
			req.Body, req.ContentLength = http.NoBody, 0
		}
		resp, err := in.transport.RoundTrip(req)
		if err != nil {
			return nil, 0, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return nil, 0, fmt.Errorf("read the response of %s %s: %w", method, path, err)
		}
		res.Payload, res.HTTPStatus, res.HTTPHeader = b, resp.StatusCode, resp.Header
		return nil, 0, nil
	}, nil
}
