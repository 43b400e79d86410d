package modelpool

import (
	pb "github.com/modelpool/modelpool/clients/go/modelpool/v1"
)

// Prompt is a request for a raw prompt, tokenized as is.
func Prompt(text string, options ...RequestOption) *pb.GenerateRequest {
	request := &pb.GenerateRequest{Input: &pb.GenerateRequest_Prompt{Prompt: text}}
	return apply(request, options)
}

// Chat is a request for a conversation, rendered with the model's chat template.
func Chat(messages []*pb.ChatMessage, options ...RequestOption) *pb.GenerateRequest {
	request := &pb.GenerateRequest{Input: &pb.GenerateRequest_Chat{Chat: &pb.ChatMessages{Messages: messages}}}
	return apply(request, options)
}

// System, User and Assistant are chat messages.
func System(content string) *pb.ChatMessage {
	return &pb.ChatMessage{Role: pb.Role_ROLE_SYSTEM, Content: content}
}

// User is a message of the user.
func User(content string) *pb.ChatMessage {
	return &pb.ChatMessage{Role: pb.Role_ROLE_USER, Content: content}
}

// Assistant is an earlier reply of the model.
func Assistant(content string) *pb.ChatMessage {
	return &pb.ChatMessage{Role: pb.Role_ROLE_ASSISTANT, Content: content}
}

// RequestOption sets a field of a request.
type RequestOption func(*pb.GenerateRequest)

// Model picks the model by name (default: the server's default model).
func Model(name string) RequestOption { return func(r *pb.GenerateRequest) { r.Model = name } }

// MaxNewTokens caps the generated tokens.
func MaxNewTokens(n uint32) RequestOption {
	return func(r *pb.GenerateRequest) { stopping(r).MaxNewTokens = n }
}

// IgnoreEOS keeps generating past the end-of-sequence token, until MaxNewTokens.
func IgnoreEOS() RequestOption { return func(r *pb.GenerateRequest) { stopping(r).IgnoreEos = true } }

// Stop ends generation at any of these texts.
func Stop(sequences ...string) RequestOption {
	return func(r *pb.GenerateRequest) {
		stopping(r).StopSequences = append(stopping(r).StopSequences, sequences...)
	}
}

// Temperature samples with this temperature (> 0).
func Temperature(t float32) RequestOption {
	return func(r *pb.GenerateRequest) {
		sampling(r).DoSample = true
		sampling(r).Temperature = t
	}
}

// TopP and TopK restrict sampling.
func TopP(p float32) RequestOption { return func(r *pb.GenerateRequest) { sampling(r).TopP = p } }

// TopK keeps the k most likely tokens.
func TopK(k uint32) RequestOption { return func(r *pb.GenerateRequest) { sampling(r).TopK = k } }

// Seed makes a sampled request repeatable.
func Seed(seed uint64) RequestOption { return func(r *pb.GenerateRequest) { sampling(r).Seed = &seed } }

func stopping(r *pb.GenerateRequest) *pb.StoppingCriteria {
	if r.Stopping == nil {
		r.Stopping = &pb.StoppingCriteria{}
	}
	return r.Stopping
}

func sampling(r *pb.GenerateRequest) *pb.SamplingParameters {
	if r.Sampling == nil {
		r.Sampling = &pb.SamplingParameters{}
	}
	return r.Sampling
}

func apply(request *pb.GenerateRequest, options []RequestOption) *pb.GenerateRequest {
	for _, option := range options {
		option(request)
	}
	return request
}

// AsStreamRequest is the same request for StreamGenerate.
func AsStreamRequest(r *pb.GenerateRequest) *pb.StreamGenerateRequest {
	stream := &pb.StreamGenerateRequest{Model: r.Model, Sampling: r.Sampling, Stopping: r.Stopping}
	switch input := r.Input.(type) {
	case *pb.GenerateRequest_Prompt:
		stream.Input = &pb.StreamGenerateRequest_Prompt{Prompt: input.Prompt}
	case *pb.GenerateRequest_Chat:
		stream.Input = &pb.StreamGenerateRequest_Chat{Chat: input.Chat}
	}
	return stream
}
