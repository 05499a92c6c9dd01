"""A vLLM-like OpenAI completions server for tests: it takes ``prompt_embeds`` as vLLM's
``--enable-prompt-embeds`` does (base64 of a torch-saved ``[positions, hidden]`` tensor) and
decodes greedily with a plain Hugging Face model (the folder ``kmerge export`` wrote), so the
vLLM backend's request format, streaming relay and the export are tested without vLLM."""

from __future__ import annotations

import json

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kmerge.serving.backends.vllm import decode_embeds


def fake_vllm_app(model, tokenizer, name: str = "exported") -> FastAPI:
    app = FastAPI()
    app.state.requests = []  # what it was sent, for the tests to look at

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        if "prompt_embeds" not in body:
            return JSONResponse({"error": {"message": "prompt_embeds required"}}, 400)
        embeds = decode_embeds(body["prompt_embeds"])
        if embeds.dim() != 2 or embeds.shape[1] != model.config.hidden_size:
            return JSONResponse({"error": {"message": f"bad shape {list(embeds.shape)}"}}, 400)
        with torch.no_grad():
            out = model.generate(
                inputs_embeds=embeds[None].to(model.dtype),
                attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                max_new_tokens=body["max_tokens"],
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )[0].tolist()
        finish = "length"
        if tokenizer.eos_token_id in out:
            out, finish = out[: out.index(tokenizer.eos_token_id)], "stop"

        def sse():
            for i, token in enumerate(out):
                text = tokenizer.decode(out[: i + 1], skip_special_tokens=True)
                prev = tokenizer.decode(out[:i], skip_special_tokens=True)
                choice = {
                    "index": 0,
                    "text": text[len(prev) :],
                    "token_ids": [token],
                    "finish_reason": None,
                }
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            done = {"index": 0, "text": "", "finish_reason": finish}
            yield f"data: {json.dumps({'choices': [done]})}\n\n"
            usage = {"prompt_tokens": embeds.shape[0], "completion_tokens": len(out)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app
