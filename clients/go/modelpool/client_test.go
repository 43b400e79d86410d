package modelpool_test

// These tests run against a live modelpool server serving the tiny test model as "tiny" (the default) and as
// "slow" (every step slowed down, so a stream is still running when it is cancelled). tests/test_go_client.py
// starts that server and runs `go test ./...` with MODELPOOL_TARGET set.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/modelpool/modelpool/clients/go/modelpool"
	pb "github.com/modelpool/modelpool/clients/go/modelpool/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var target = os.Getenv("MODELPOOL_TARGET")

func TestMain(m *testing.M) {
	if target == "" {
		fmt.Fprintln(os.Stderr, "MODELPOOL_TARGET is not set: run these tests through tests/test_go_client.py,"+
			" or point MODELPOOL_TARGET at a server serving the tiny test model as \"tiny\" and \"slow\"")
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func dial(t *testing.T, options ...modelpool.Option) *modelpool.Client {
	t.Helper()
	client, err := modelpool.Dial(target, append([]modelpool.Option{modelpool.WithTimeout(2 * time.Minute)}, options...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

func TestGenerate(t *testing.T) {
	client := dial(t)
	reply, err := client.Generate(context.Background(), modelpool.Prompt("Hello from Go", modelpool.MaxNewTokens(8), modelpool.IgnoreEOS()))
	if err != nil {
		t.Fatal(err)
	}
	if reply.Usage.CompletionTokens != 8 || len(reply.TokenIds) != 8 {
		t.Fatalf("want 8 tokens, got usage %v and %d token ids", reply.Usage, len(reply.TokenIds))
	}
	if reply.FinishReason != pb.FinishReason_FINISH_REASON_LENGTH || reply.Model != "tiny" || reply.Text == "" {
		t.Fatalf("unexpected reply %v", reply)
	}
}

func TestStreamDeltasConcatenateToTheUnaryText(t *testing.T) {
	client := dial(t)
	request := modelpool.Chat(
		[]*pb.ChatMessage{modelpool.System("Be brief."), modelpool.User("Tell me a story")},
		modelpool.MaxNewTokens(24), modelpool.IgnoreEOS(),
	)
	unary, err := client.Generate(context.Background(), request)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := client.Stream(context.Background(), request)
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	var tokens int
	pieces := 0
	for {
		piece, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		pieces++
		text.WriteString(piece.TextDelta)
		tokens += len(piece.TokenIds)
	}
	if text.String() != unary.Text {
		t.Fatalf("stream %q != unary %q", text.String(), unary.Text)
	}
	last := stream.Last()
	if tokens != 24 || pieces < 2 || last.FinishReason != pb.FinishReason_FINISH_REASON_LENGTH || last.Usage.CompletionTokens != 24 {
		t.Fatalf("tokens=%d pieces=%d last=%v", tokens, pieces, last)
	}
	if last.Usage.PromptTokens != unary.Usage.PromptTokens {
		t.Fatalf("prompt tokens differ: %d vs %d", last.Usage.PromptTokens, unary.Usage.PromptTokens)
	}
}

func inFlight(t *testing.T, client *modelpool.Client, model string) uint32 {
	t.Helper()
	models, err := client.ListModels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range models {
		if m.Name == model {
			var total uint32
			for _, w := range m.Workers {
				total += w.OutstandingRequests // running or waiting
			}
			return total
		}
	}
	t.Fatalf("model %q not listed", model)
	return 0
}

func waitIdle(t *testing.T, client *modelpool.Client, model string) {
	t.Helper()
	// The slow model would need minutes to finish these requests by itself; 30 s is only a bound.
	deadline := time.Now().Add(30 * time.Second)
	for inFlight(t, client, model) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s still has requests in flight: the cancelled call did not free its slot", model)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func startSlowStream(t *testing.T, ctx context.Context, client *modelpool.Client) *modelpool.Stream {
	t.Helper()
	stream, err := client.Stream(ctx, modelpool.Prompt("go", modelpool.Model("slow"), modelpool.MaxNewTokens(400), modelpool.IgnoreEOS()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	if inFlight(t, client, "slow") != 1 {
		t.Fatal("the stream is not counted in flight")
	}
	return stream
}

func TestCancellingTheContextFreesTheWorkerSlot(t *testing.T) {
	client := dial(t)
	waitIdle(t, client, "slow")
	ctx, cancel := context.WithCancel(context.Background())
	stream := startSlowStream(t, ctx, client)
	cancel()
	_, err := stream.Recv()
	for err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.Canceled {
		t.Fatalf("want Canceled, got %v", err)
	}
	waitIdle(t, client, "slow")
}

func TestClosingAStreamFreesTheWorkerSlot(t *testing.T) {
	client := dial(t)
	waitIdle(t, client, "slow")
	stream := startSlowStream(t, context.Background(), client)
	stream.Close()
	waitIdle(t, client, "slow")
}

func TestErrorsAreStatuses(t *testing.T) {
	client := dial(t)
	_, err := client.Generate(context.Background(), modelpool.Prompt("x", modelpool.Model("no-such-model")))
	s, ok := status.FromError(err)
	if !ok || s.Code() != codes.NotFound || !strings.Contains(s.Message(), "'no-such-model'") {
		t.Fatalf("want NOT_FOUND naming the model, got %v", err)
	}

	request := modelpool.Prompt("x", modelpool.TopP(1.5))
	_, err = client.Generate(context.Background(), request)
	s, _ = status.FromError(err)
	if s.Code() != codes.InvalidArgument || !strings.HasPrefix(s.Message(), "sampling.top_p") {
		t.Fatalf("want INVALID_ARGUMENT starting with the field name, got %v", err)
	}

	// A stream reports a bad request on its first Recv.
	stream, err := client.Stream(context.Background(), modelpool.Prompt("", modelpool.TopP(1.5)))
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("want INVALID_ARGUMENT from the stream, got %v", err)
	}
}

func TestDeadlineOption(t *testing.T) {
	client := dial(t)
	short, err := modelpool.Dial(target, modelpool.WithTimeout(300*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer short.Close()
	_, err = short.Generate(context.Background(), modelpool.Prompt("go", modelpool.Model("slow"), modelpool.MaxNewTokens(400), modelpool.IgnoreEOS()))
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("want DEADLINE_EXCEEDED, got %v", err)
	}
	// A deadline in the context wins over the client's.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := short.Generate(ctx, modelpool.Prompt("go", modelpool.MaxNewTokens(2), modelpool.IgnoreEOS())); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, client, "slow")
}

func TestMetadataReachesTheServer(t *testing.T) {
	// The server ignores unknown headers; a malformed one would fail the call, so this checks they are sent well.
	client := dial(t, modelpool.WithMetadata("x-request-id", "go-test"), modelpool.WithToken("secret"))
	if _, err := client.Generate(context.Background(), modelpool.Prompt("x", modelpool.MaxNewTokens(1))); err != nil {
		t.Fatal(err)
	}
}

func TestListModels(t *testing.T) {
	client := dial(t)
	models, err := client.ListModels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]*pb.ModelInfo{}
	for _, m := range models {
		names[m.Name] = m
	}
	tiny, ok := names["tiny"]
	if !ok || !tiny.IsDefault || len(tiny.Workers) == 0 || names["slow"] == nil {
		t.Fatalf("unexpected models %v", models)
	}
	for _, w := range tiny.Workers {
		if w.State != pb.WorkerState_WORKER_STATE_READY || w.Pid == 0 {
			t.Fatalf("worker not ready: %v", w)
		}
	}
}

func TestEachStopsOnTheCallbacksError(t *testing.T) {
	client := dial(t)
	stream, err := client.Stream(context.Background(), modelpool.Prompt("x", modelpool.MaxNewTokens(16), modelpool.IgnoreEOS()))
	if err != nil {
		t.Fatal(err)
	}
	stop := errors.New("enough")
	if err := stream.Each(func(*pb.StreamGenerateResponse) error { return stop }); err != stop {
		t.Fatalf("want the callback's error, got %v", err)
	}
}
