// Package modelpool is a small Go client for the modelpool gRPC service.
//
//	c, err := modelpool.Dial("127.0.0.1:50051", modelpool.WithTimeout(30*time.Second))
//	reply, err := c.Generate(ctx, modelpool.Chat(modelpool.User("Hello!")))
//
// Errors are the gRPC status errors themselves: read them with status.FromError (or status.Code).
package modelpool

import (
	"context"
	"crypto/tls"
	"time"

	pb "github.com/modelpool/modelpool/clients/go/modelpool/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// Client calls one modelpool server. It is safe for concurrent use.
type Client struct {
	conn     *grpc.ClientConn
	stub     pb.GenerationServiceClient
	timeout  time.Duration
	metadata []string
}

type settings struct {
	timeout  time.Duration
	tls      *tls.Config
	metadata []string
	dial     []grpc.DialOption
}

// Option configures a Client.
type Option func(*settings)

// WithTimeout sets the deadline of every call whose context has none.
func WithTimeout(d time.Duration) Option { return func(s *settings) { s.timeout = d } }

// WithTLS dials with TLS; a config with Certificates presents a client certificate (mutual TLS).
func WithTLS(config *tls.Config) Option { return func(s *settings) { s.tls = config } }

// WithMetadata sends a header with every call.
func WithMetadata(key, value string) Option {
	return func(s *settings) { s.metadata = append(s.metadata, key, value) }
}

// WithToken sends "authorization: Bearer <token>" with every call.
func WithToken(token string) Option { return WithMetadata("authorization", "Bearer "+token) }

// WithDialOptions passes options to grpc.Dial as they are.
func WithDialOptions(options ...grpc.DialOption) Option {
	return func(s *settings) { s.dial = append(s.dial, options...) }
}

// Dial connects lazily to target ("host:port"), in plaintext unless WithTLS is given.
func Dial(target string, options ...Option) (*Client, error) {
	s := settings{}
	for _, option := range options {
		option(&s)
	}
	transport := grpc.WithInsecure()
	if s.tls != nil {
		transport = grpc.WithTransportCredentials(credentials.NewTLS(s.tls))
	}
	conn, err := grpc.Dial(target, append([]grpc.DialOption{transport}, s.dial...)...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, stub: pb.NewGenerationServiceClient(conn), timeout: s.timeout, metadata: s.metadata}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// callContext adds the client's metadata and, when ctx has no deadline, the client's timeout.
func (c *Client) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if len(c.metadata) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, c.metadata...)
	}
	if _, has := ctx.Deadline(); !has && c.timeout > 0 {
		return context.WithTimeout(ctx, c.timeout)
	}
	return context.WithCancel(ctx)
}

// Generate returns the whole completion once it is finished.
func (c *Client) Generate(ctx context.Context, request *pb.GenerateRequest, options ...grpc.CallOption) (*pb.GenerateResponse, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	return c.stub.Generate(ctx, request, options...)
}

// ListModels describes the served models and their workers.
func (c *Client) ListModels(ctx context.Context, options ...grpc.CallOption) ([]*pb.ModelInfo, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	reply, err := c.stub.ListModels(ctx, &pb.ListModelsRequest{}, options...)
	if err != nil {
		return nil, err
	}
	return reply.Models, nil
}

// Stream starts a streamed completion. Read it with Recv until io.EOF; Close (or cancelling ctx) cancels the
// call and so frees its slot on the server.
func (c *Client) Stream(ctx context.Context, request *pb.GenerateRequest, options ...grpc.CallOption) (*Stream, error) {
	ctx, cancel := c.callContext(ctx)
	stream, err := c.stub.StreamGenerate(ctx, AsStreamRequest(request), options...)
	if err != nil {
		cancel()
		return nil, err
	}
	return &Stream{stream: stream, cancel: cancel}, nil
}
