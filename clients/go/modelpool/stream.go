package modelpool

import (
	"context"
	"io"
	"strings"

	pb "github.com/modelpool/modelpool/clients/go/modelpool/v1"
)

// Stream is one streamed completion.
type Stream struct {
	stream pb.GenerationService_StreamGenerateClient
	cancel context.CancelFunc
	last   *pb.StreamGenerateResponse
}

// Recv returns the next piece, io.EOF once the completion has ended normally, or the call's status error.
func (s *Stream) Recv() (*pb.StreamGenerateResponse, error) {
	piece, err := s.stream.Recv()
	if err != nil {
		// Finished or failed: release the context either way.
		s.cancel()
		return nil, err
	}
	s.last = piece
	return piece, nil
}

// Last is the latest piece received; after io.EOF it carries the finish reason, usage and timings.
func (s *Stream) Last() *pb.StreamGenerateResponse { return s.last }

// Header is the server's response header metadata.
func (s *Stream) Header() (map[string][]string, error) { return s.stream.Header() }

// Close cancels the call if it is still running; it is safe to call more than once.
func (s *Stream) Close() { s.cancel() }

// Each calls f with every piece until the end of the stream; the first error (of f or of the call) ends it.
// A normal end returns nil.
func (s *Stream) Each(f func(*pb.StreamGenerateResponse) error) error {
	defer s.Close()
	for {
		piece, err := s.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := f(piece); err != nil {
			return err
		}
	}
}

// Text reads the stream to its end and returns the concatenated text.
func (s *Stream) Text() (string, error) {
	var text strings.Builder
	err := s.Each(func(piece *pb.StreamGenerateResponse) error {
		text.WriteString(piece.TextDelta)
		return nil
	})
	return text.String(), err
}
