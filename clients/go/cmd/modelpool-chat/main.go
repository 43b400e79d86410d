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
	cert := flag.String("cert", "", "PEM client certificate for mutual TLS (with -key)")
	key := flag.String("key", "", "PEM private key of -cert")
	usage := flag.Bool("usage", false, "print token counts to stderr at the end")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: modelpool-chat [flags] message...")
		os.Exit(2)
	}
	tlsConfig, err := tlsFromFiles(*ca, *cert, *key)
	if err != nil {
		fmt.Fprintln(os.Stderr, "modelpool-chat:", err)
		os.Exit(2)
	}
	os.Exit(run(*target, *model, *system, strings.Join(flag.Args(), " "), uint32(*maxNewTokens), *timeout, *token, tlsConfig, *usage))
}

// tlsFromFiles is nil (plaintext) without a CA; a certificate and key make it mutual TLS.
func tlsFromFiles(ca, cert, key string) (*tls.Config, error) {
	if ca == "" {
		if cert != "" || key != "" {
			return nil, fmt.Errorf("-cert and -key need -ca")
		}
		return nil, nil
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate", ca)
	}
	config := &tls.Config{RootCAs: roots}
	if cert != "" || key != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

func run(target, model, system, message string, maxNewTokens uint32, timeout time.Duration, token string, tlsConfig *tls.Config, usage bool) int {
	options := []modelpool.Option{modelpool.WithTimeout(timeout)}
	if token != "" {
		options = append(options, modelpool.WithToken(token))
	}
	if tlsConfig != nil {
		options = append(options, modelpool.WithTLS(tlsConfig))
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
