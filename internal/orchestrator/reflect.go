package orchestrator

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	reflectpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

// resolveMethod finds a method's descriptor through the instance's gRPC
// server reflection (grpc.reflection.v1), once per function: the types of a
// deployed function do not change until it is redeployed.
func (f *function) resolveMethod(ctx context.Context, in *instance, method string) (protoreflect.MethodDescriptor, error) {
	f.mu.Lock()
	md, ok := f.methods[method]
	f.mu.Unlock()
	if ok {
		return md, nil
	}
	md, err := ReflectMethod(ctx, reflectpb.NewServerReflectionClient(in.conn), method)
	if err != nil {
		return nil, fmt.Errorf("function %q: %w", f.spec.Name, err)
	}
	f.mu.Lock()
	if f.methods == nil {
		f.methods = map[string]protoreflect.MethodDescriptor{}
	}
	f.methods[method] = md
	f.mu.Unlock()
	return md, nil
}

// ReflectMethod resolves method ("/pkg.Service/Method") with a server's
// reflection service: the file defining the service and every file it
// imports.
func ReflectMethod(ctx context.Context, rc reflectpb.ServerReflectionClient, method string) (protoreflect.MethodDescriptor, error) {
	svc, _, _ := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	stream, err := rc.ServerReflectionInfo(ctx)
	if err != nil {
		return nil, fmt.Errorf("server reflection: %w", err)
	}
	defer stream.CloseSend()
	ask := func(req *reflectpb.ServerReflectionRequest) ([][]byte, error) {
		if err := stream.Send(req); err != nil {
			return nil, err
		}
		resp, err := stream.Recv()
		if err != nil {
			return nil, err
		}
		if e := resp.GetErrorResponse(); e != nil {
			return nil, status.Error(codes.Code(e.GetErrorCode()), e.GetErrorMessage())
		}
		return resp.GetFileDescriptorResponse().GetFileDescriptorProto(), nil
	}
	files := map[string]*descriptorpb.FileDescriptorProto{}
	add := func(raw [][]byte) error {
		for _, b := range raw {
			fd := &descriptorpb.FileDescriptorProto{}
			if err := proto.Unmarshal(b, fd); err != nil {
				return fmt.Errorf("server reflection sent a bad file descriptor: %w", err)
			}
			files[fd.GetName()] = fd
		}
		return nil
	}
	raw, err := ask(&reflectpb.ServerReflectionRequest{MessageRequest: &reflectpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: svc}})
	if status.Code(err) == codes.Unimplemented {
		return nil, fmt.Errorf("%w: the function serves no gRPC server reflection: send the request as serialized protobuf (vhive invoke --data-file, or --protoset FILE)", ErrInvalid)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: service %q by server reflection: %v", ErrInvalid, svc, err)
	}
	if err := add(raw); err != nil {
		return nil, err
	}
	// Imports the server did not send with the file.
	for missing := true; missing; {
		missing = false
		for _, fd := range files {
			for _, dep := range fd.GetDependency() {
				if _, ok := files[dep]; ok {
					continue
				}
				missing = true
				raw, err := ask(&reflectpb.ServerReflectionRequest{MessageRequest: &reflectpb.ServerReflectionRequest_FileByFilename{FileByFilename: dep}})
				if err != nil {
					return nil, fmt.Errorf("server reflection: file %q: %w", dep, err)
				}
				if err := add(raw); err != nil {
					return nil, err
				}
				if _, ok := files[dep]; !ok {
					return nil, fmt.Errorf("server reflection did not send file %q", dep)
				}
			}
		}
	}
	set := &descriptorpb.FileDescriptorSet{}
	for _, fd := range files {
		set.File = append(set.File, fd)
	}
	return MethodFromSet(set, method)
}

// MethodFromSet finds method ("/pkg.Service/Method") in a set of file
// descriptors (server reflection's, or a protoset file's).
func MethodFromSet(set *descriptorpb.FileDescriptorSet, method string) (protoreflect.MethodDescriptor, error) {
	svc, name, _ := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	reg, err := protodesc.NewFiles(set)
	if err != nil {
		return nil, fmt.Errorf("%w: file descriptors: %v", ErrInvalid, err)
	}
	d, err := reg.FindDescriptorByName(protoreflect.FullName(svc))
	if err != nil {
		return nil, fmt.Errorf("%w: service %q not found: %v", ErrInvalid, svc, err)
	}
	sd, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return nil, fmt.Errorf("%w: %q is not a service", ErrInvalid, svc)
	}
	md := sd.Methods().ByName(protoreflect.Name(name))
	if md == nil {
		return nil, fmt.Errorf("%w: service %q has no method %q", ErrInvalid, svc, name)
	}
	if md.IsStreamingClient() || md.IsStreamingServer() {
		return nil, fmt.Errorf("%w: method %s streams: call it through the gateway", ErrInvalid, method)
	}
	return md, nil
}
