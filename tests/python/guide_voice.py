# The guide's FastAPI /voice handler, verbatim (shared/seed/claim-and-route-a-number.md).
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
app = FastAPI()
@app.post("/voice")
async def voice(request: Request):
    form = await request.form()
    caller = form.get("From") or form.get("from") or "unknown"
    return JSONResponse({
        "actions": [
            {"say": {"text": f"Hello, thank you for calling.", "voice": "alice", "language": "en-US"}},
            {"hangup": {}}
        ]
    })
