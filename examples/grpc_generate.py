"""Talk to Prism's gRPC services directly (no gateway): encode images, stream a completion.

    python examples/grpc_generate.py --prompt "What is in this picture?" --image cat.jpg
    python examples/grpc_generate.py --decoder 127.0.0.1:50052 --prompt "Write a haiku."

The encoder stores each image's features in the cache and returns a reference (content key,
placeholder count, grid); the decoder fetches the features from the cache by that key. So only
small references travel in the Generate call. Text deltas go to stdout as they arrive; the
finish reason and token counts go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
import uuid
from pathlib import Path

import grpc
from prism.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
)

TIMEOUT_S = 600.0  # every call carries a deadline


def read_media(source: str) -> bytes:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=30) as reply:
            return reply.read()
    return Path(source).expanduser().read_bytes()


def pick_model(decoder: decoder_pb2_grpc.DecoderStub, rid: str) -> str:
    """The decoder's first served model (when --model is not given)."""
    reply = decoder.ListModels(common_pb2.ListModelsRequest(), timeout=10, metadata=meta(rid))
    if not reply.models:
        sys.exit("the decoder serves no model")
    return reply.models[0].id


def encode(
    address: str, model: str, images: list[str], rid: str
) -> list[common_pb2.MediaFeatureRef]:
    with grpc.insecure_channel(address) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        items = [
            encoder_pb2.MediaItem(modality=common_pb2.MODALITY_IMAGE, data=read_media(image))
            for image in images
        ]
        request = encoder_pb2.EncodeRequest(request_id=rid, model=model, items=items)
        reply = stub.Encode(request, timeout=TIMEOUT_S, metadata=meta(rid))
    for item in reply.items:
        hit = "cache hit" if item.cache_hit else f"{item.encode_ns / 1e6:.1f} ms"
        print(
            f"[encoded {item.ref.content_key[:12]}: {item.ref.num_tokens} tokens, {hit}]",
            file=sys.stderr,
        )
    return [item.ref for item in reply.items]


def build_request(
    args: argparse.Namespace, model: str, refs: list[common_pb2.MediaFeatureRef], rid: str
) -> decoder_pb2.GenerateRequest:
    parts = [decoder_pb2.ContentPart(media=ref) for ref in refs]  # media first, as Qwen does
    parts.append(decoder_pb2.ContentPart(text=args.prompt))
    messages = []
    if args.system:
        messages.append(
            decoder_pb2.ChatMessage(
                role="system", content=[decoder_pb2.ContentPart(text=args.system)]
            )
        )
    messages.append(decoder_pb2.ChatMessage(role="user", content=parts))
    sampling = decoder_pb2.SamplingParams(temperature=args.temperature)
    if args.seed is not None:
        sampling.seed = args.seed
    return decoder_pb2.GenerateRequest(
        request_id=rid,
        model=model,
        messages=decoder_pb2.Messages(messages=messages, add_generation_prompt=True),
        sampling=sampling,
        stop=decoder_pb2.StopConditions(max_tokens=args.max_tokens),
    )


def meta(rid: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", rid),)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--decoder", default="127.0.0.1:50052", help="decoder host:port")
    p.add_argument("--encoder", default="127.0.0.1:50051", help="encoder host:port (images only)")
    p.add_argument("--model", default=None, help="served model id (default: the decoder's first)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="path or URL; repeatable")
    p.add_argument("--system", default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    rid = uuid.uuid4().hex
    with grpc.insecure_channel(args.decoder) as channel:
        decoder = decoder_pb2_grpc.DecoderStub(channel)
        try:
            model = args.model or pick_model(decoder, rid)
            refs = encode(args.encoder, model, args.image, rid) if args.image else []
            stream = decoder.Generate(
                build_request(args, model, refs, rid), timeout=TIMEOUT_S, metadata=meta(rid)
            )
            for event in stream:
                if event.HasField("delta"):
                    sys.stdout.write(event.delta.text)
                    sys.stdout.flush()
                else:
                    finish = event.finish
                    reason = decoder_pb2.FinishReason.Name(finish.reason)
                    print(
                        f"\n[{reason}: {finish.usage.prompt_tokens} prompt tokens, "
                        f"{finish.usage.completion_tokens} completion tokens]",
                        file=sys.stderr,
                    )
                    if finish.error:
                        print(f"error: {finish.error}", file=sys.stderr)
                        return 1
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
