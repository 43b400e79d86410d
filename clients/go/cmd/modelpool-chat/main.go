// Command modelpool-chat streams a chat answer from a modelpool server to stdout.
//
//	modelpool-chat -target 127.0.0.1:50051 "What is the capital of France?"
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/modelpool/modelpool/clients/go/modelpool"
	pb "github.com/modelpool/modelpool/clients/go/modelpool/v1"
	"google.golang.org/grpc/status"
)

func main() {
	target := flag.String("target", envOr("MODELPOOL_TARGET", "127.0.0.1:50051"), "server address")
	model := flag.String("model", "", "model name (default: the server's default model)")
	system := flag.String("system", "", "a system message")
	maxNewTokens := flag.Uint("max-new-tokens", 0, "the most tokens to generate (0: the server's default)")
	timeout := flag.Duration("timeout", 5*time.Minute, "deadline of the call")
	token := flag.String("token", os.Getenv("MODELPOOL_TOKEN"), "bearer token")
	ca := flag.String("ca", "", "PEM file of the certificate authority to trust (enables TLS)")
	usage := flag.Bool("usage", false, "print token counts to stderr at the end")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: modelpool-chat [flags] message...")
		os.Exit(2)
	}
	os.Exit(run(*target, *model, *system, strings.Join(flag.Args(), " "), uint32(*maxNewTokens), *timeout, *token, *ca, *usage))
}

func run(target, model, system, message string, maxNewTokens uint32, timeout time.Duration, token, ca string, usage bool) int {
	options := []modelpool.Option{modelpool.WithTimeout(timeout)}
	if token != "" {
		options = append(options, modelpool.WithToken(token))
	}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			fmt.Fprintln(os.Stderr, "modelpool-chat:", err)
			return 2
		}
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM(pem)
		options = append(options, modelpool.WithTLS(&tls.Config{RootCAs: roots}))
	}
	client, err := modelpool.Dial(target, options...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "modelpool-chat:", err)
		return 1
	}
	defer client.Close()

	// Ctrl-C cancels the call, which frees its slot on the server.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	var messages []*pb.ChatMessage
	if system != "" {
		messages = append(messages, modelpool.System(system))
	}
	request := modelpool.Chat(append(messages, modelpool.User(message)), modelpool.Model(model), modelpool.MaxNewTokens(maxNewTokens))
	stream, err := client.Stream(ctx, request)
	if err == nil {
		err = stream.Each(func(piece *pb.StreamGenerateResponse) error {
			_, werr := os.Stdout.WriteString(piece.TextDelta)
			return werr
		})
	}
	fmt.Println()
	if err != nil {
		s, _ := status.FromError(err)
		fmt.Fprintf(os.Stderr, "modelpool-chat: %s: %s\n", s.Code(), s.Message())
		return 1
	}
	if last := stream.Last(); usage && last != nil {
		fmt.Fprintf(os.Stderr, "[prompt_tokens=%d completion_tokens=%d finish=%s]\n",
			last.GetUsage().GetPromptTokens(), last.GetUsage().GetCompletionTokens(), last.GetFinishReason())
	}
	return 0
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}
