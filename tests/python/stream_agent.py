"""A voice agent for media-stream tests, written from Twilio's published Media Streams message
format alone (https://www.twilio.com/docs/voice/media-streams/websocket-messages): it speaks only
`connected`, `start`, `media`, `dtmf`, `mark`, `stop` in, and `media`, `mark`, `clear` out.

    python stream_agent.py PORT LOGFILE

Every message received is appended to LOGFILE as a JSON line {"t": <unix seconds>, "msg": ...};
what the agent itself does is logged as {"t": ..., "did": ...}. What it does depends on the
`mode` custom parameter of `start`:

- echo:  every inbound `media` payload is sent back 200 ms later;
- marks: 3 s of a 440 Hz tone is sent at once, then a mark "after-tone"; with `clear_after_ms`,
         a `clear` follows that long after the audio;
- listen: nothing is sent (fork-mode and DTMF tests read the log).
"""

import asyncio
import base64
import json
import math
import sys
import time

from websockets.asyncio.server import serve

PORT = int(sys.argv[1])
LOGFILE = sys.argv[2]


def log(entry):
    entry["t"] = time.time()
    with open(LOGFILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def ulaw(sample):
    """16-bit linear to G.711 mu-law (the classic algorithm)."""
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    if sample < 0:
        sample = -sample
    sample = min(sample, clip) + bias
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not (sample & mask):
        exponent -= 1
        mask >>= 1
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def tone(seconds):
    n = int(8000 * seconds)
    return bytes(ulaw(int(8000 * math.sin(2 * math.pi * 440 * i / 8000))) for i in range(n))


async def agent(ws):
    stream_sid = None
    params = {}
    async for raw in ws:
        msg = json.loads(raw)
        log({"msg": msg})
        event = msg.get("event")
        if event == "start":
            stream_sid = msg["start"]["streamSid"]
            params = msg["start"].get("customParameters", {})
            if params.get("mode") == "marks":
                audio = tone(3.0)
                for i in range(0, len(audio), 160):
                    await ws.send(json.dumps({
                        "event": "media",
                        "streamSid": stream_sid,
                        "media": {"payload": base64.b64encode(audio[i:i + 160]).decode()},
                    }))
                await ws.send(json.dumps({
                    "event": "mark", "streamSid": stream_sid, "mark": {"name": "after-tone"},
                }))
                log({"did": "sent-tone-and-mark"})
                clear_after = params.get("clear_after_ms")
                if clear_after:
                    asyncio.get_running_loop().call_later(
                        int(clear_after) / 1000, lambda: asyncio.ensure_future(clear(ws, stream_sid)))
        elif event == "media" and params.get("mode") == "echo":
            payload = msg["media"]["payload"]
            asyncio.get_running_loop().call_later(
                0.2, lambda p=payload: asyncio.ensure_future(send_media(ws, stream_sid, p)))
        elif event == "stop":
            break


async def send_media(ws, stream_sid, payload):
    try:
        await ws.send(json.dumps({
            "event": "media", "streamSid": stream_sid, "media": {"payload": payload},
        }))
    except Exception:
        pass


async def clear(ws, stream_sid):
    log({"did": "clear"})
    await ws.send(json.dumps({"event": "clear", "streamSid": stream_sid}))


async def main():
    async with serve(agent, "127.0.0.1", PORT):
        await asyncio.get_running_loop().create_future()


asyncio.run(main())
