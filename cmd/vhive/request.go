package main

import (
	"cmp"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reflectpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/invoker"
	"vhive.dev/vhive/internal/orchestrator"
)

// requestOpts are the flags that say what request a function gets beyond
// vHive's SayHello payload: a gRPC method and its request, or an HTTP
// request.
type requestOpts struct {
	method     string
	data       string
	dataFile   string
	protoset   string
	httpMethod string
	path       string
	headers    []string
}

func (o *requestOpts) addFlags(f *pflag.FlagSet) {
	f.StringVar(&o.method, "method", "", "gRPC method to call, pkg.Service/Method (default: helloworld.Greeter/SayHello with --payload)")
	f.StringVar(&o.data, "data", "", "with --method: the request in protobuf JSON; for an HTTP function: the body")
	f.StringVar(&o.dataFile, "data-file", "", "file whose bytes are the request as it is: the serialized message (--method) or the HTTP body")
	f.StringVar(&o.protoset, "protoset", "", "with --method and --data: a FileDescriptorSet (protoc --descriptor_set_out --include_imports) instead of the function's server reflection")
	f.StringVar(&o.httpMethod, "http-method", "", "HTTP function: request method (default GET, or POST with a body)")
	f.StringVar(&o.path, "path", "", "HTTP function: path and query (default /)")
	f.StringArrayVarP(&o.headers, "header", "H", nil, "HTTP function: request header 'Name: value' (repeatable)")
}

// request builds the invocation request. decode, when not nil, turns the
// reply's bytes into what is printed (a protoset-encoded reply into JSON).
func (o *requestOpts) request(payload string, payloadSet bool) (req *vhivepb.InvokeRequest, decode func([]byte) ([]byte, error), err error) {
	req = &vhivepb.InvokeRequest{Payload: []byte(payload)}
	if o.data != "" && o.dataFile != "" {
		return nil, nil, fmt.Errorf("--data and --data-file: give one")
	}
	isHTTP := o.httpMethod != "" || o.path != "" || len(o.headers) > 0
	if isHTTP && o.method != "" {
		return nil, nil, fmt.Errorf("--method is for gRPC functions; --http-method, --path and -H for HTTP ones: give one kind")
	}
	if (o.data != "" || o.dataFile != "") && payloadSet {
		return nil, nil, fmt.Errorf("--payload is SayHello's name; --data/--data-file the request of --method or an HTTP function: give one")
	}
	if o.protoset != "" && (o.method == "" || o.data == "") {
		return nil, nil, fmt.Errorf("--protoset converts the JSON of --data for --method: give both")
	}
	body := []byte(o.data)
	if o.dataFile != "" {
		if body, err = os.ReadFile(o.dataFile); err != nil {
			return nil, nil, fmt.Errorf("--data-file: %w", err)
		}
	}
	if o.data != "" || o.dataFile != "" {
		req.Payload = body
	}
	if isHTTP {
		hr := &vhivepb.HTTPRequest{Method: strings.ToUpper(o.httpMethod), Path: o.path}
		for _, h := range o.headers {
			k, v, ok := strings.Cut(h, ":")
			if !ok || strings.TrimSpace(k) == "" {
				return nil, nil, fmt.Errorf("-H %q: want 'Name: value'", h)
			}
			hr.Headers = append(hr.Headers, &vhivepb.Header{Name: strings.TrimSpace(k), Value: strings.TrimSpace(v)})
		}
		req.Http = hr
		return req, nil, nil
	}
	if o.method == "" {
		return req, nil, nil
	}
	m, err := orchestrator.NormalizeMethod(o.method)
	if err != nil {
		return nil, nil, fmt.Errorf("--method: %w", err)
	}
	req.Method = m
	if o.data == "" {
		return req, nil, nil // raw bytes (or an empty request)
	}
	if o.protoset == "" {
		req.Json = true // the daemon converts with the function's reflection
		return req, nil, nil
	}
	raw, err := os.ReadFile(o.protoset)
	if err != nil {
		return nil, nil, fmt.Errorf("--protoset: %w", err)
	}
	set := &descriptorpb.FileDescriptorSet{}
	if err := proto.Unmarshal(raw, set); err != nil {
		return nil, nil, fmt.Errorf("--protoset %s: not a FileDescriptorSet: %w", o.protoset, err)
	}
	md, err := orchestrator.MethodFromSet(set, m)
	if err != nil {
		return nil, nil, fmt.Errorf("--protoset %s: %w", o.protoset, err)
	}
	msg := dynamicpb.NewMessage(md.Input())
	if err := protojson.Unmarshal(body, msg); err != nil {
		return nil, nil, fmt.Errorf("--data is not a %s in protobuf JSON: %w", md.Input().FullName(), err)
	}
	if req.Payload, err = proto.Marshal(msg); err != nil {
		return nil, nil, err
	}
	decode = func(b []byte) ([]byte, error) {
		out := dynamicpb.NewMessage(md.Output())
		if err := proto.Unmarshal(b, out); err != nil {
			return nil, fmt.Errorf("reply is not a %s: %w", md.Output().FullName(), err)
		}
		return protojson.Marshal(out)
	}
	return req, decode, nil
}

// invokerRequestFlags are the invoker's request flags (vSwarm-style).
type invokerRequestFlags struct {
	method, data, dataFile, protoset string
	http                             bool
	httpMethod, path                 string
	headers                          []string
}

// invokerRequest sets the invoker's request from its flags: a gRPC method's
// serialized request (JSON converted with -protoset or the first endpoint's
// server reflection) or an HTTP request.
func invokerRequest(ctx context.Context, cfg *invoker.Config, f invokerRequestFlags) error {
	if f.data != "" && f.dataFile != "" {
		return fmt.Errorf("-data and -data-file: give one")
	}
	body := []byte(f.data)
	if f.dataFile != "" {
		var err error
		if body, err = os.ReadFile(f.dataFile); err != nil {
			return fmt.Errorf("-data-file: %w", err)
		}
	}
	if f.http {
		if f.method != "" {
			return fmt.Errorf("-method is for gRPC functions, -http for HTTP ones: give one")
		}
		hr := &invoker.HTTPRequest{Method: strings.ToUpper(f.httpMethod), Path: f.path, Header: http.Header{}, Body: body}
		for _, h := range f.headers {
			k, v, ok := strings.Cut(h, ":")
			if !ok || strings.TrimSpace(k) == "" {
				return fmt.Errorf("-H %q: want 'Name: value'", h)
			}
			hr.Header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
		}
		cfg.HTTP = hr
		return nil
	}
	if f.method == "" {
		if len(body) > 0 || len(f.headers) > 0 || f.httpMethod != "" {
			return fmt.Errorf("-data, -data-file, -H and -http-method need -method or -http")
		}
		return nil
	}
	m, err := orchestrator.NormalizeMethod(f.method)
	if err != nil {
		return fmt.Errorf("-method: %w", err)
	}
	cfg.Method, cfg.Request = m, body
	if f.data == "" {
		return nil
	}
	var md protoreflect.MethodDescriptor
	if f.protoset != "" {
		raw, err := os.ReadFile(f.protoset)
		if err != nil {
			return fmt.Errorf("-protoset: %w", err)
		}
		set := &descriptorpb.FileDescriptorSet{}
		if err := proto.Unmarshal(raw, set); err != nil {
			return fmt.Errorf("-protoset %s: not a FileDescriptorSet: %w", f.protoset, err)
		}
		if md, err = orchestrator.MethodFromSet(set, m); err != nil {
			return fmt.Errorf("-protoset %s: %w", f.protoset, err)
		}
	} else {
		if len(cfg.Endpoints) == 0 {
			return fmt.Errorf("-data: no endpoint to ask for the types of %s", m)
		}
		ep := cfg.Endpoints[0]
		target := cmp.Or(cfg.Addr, ep.Address, net.JoinHostPort(ep.Hostname, strconv.Itoa(cfg.Port)))
		conn, err := grpc.NewClient("passthrough:///"+target, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority(ep.Hostname))
		if err != nil {
			return err
		}
		defer conn.Close()
		rctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
		defer cancel()
		if md, err = orchestrator.ReflectMethod(rctx, reflectpb.NewServerReflectionClient(conn), m); err != nil {
			return fmt.Errorf("-data: the types of %s from %s's server reflection: %w", m, ep.Hostname, err)
		}
	}
	msg := dynamicpb.NewMessage(md.Input())
	if err := protojson.Unmarshal(body, msg); err != nil {
		return fmt.Errorf("-data is not a %s in protobuf JSON: %w", md.Input().FullName(), err)
	}
	cfg.Request, err = proto.Marshal(msg)
	return err
}
