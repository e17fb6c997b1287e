// Conversation mode of the GLM-4-Voice web demo: the microphone streams to the server over the tab's
// live socket (glm4voice/web/live.py); the server detects the turns (silero-vad) and answers them, and
// the answers play through the page's player (player.js).
//
// The microphone: getUserMedia with the browser's echo cancellation (plus noise suppression and gain
// control), an AudioWorklet (mic_worklet.js, served at window.GLM4VOICE_MIC_WORKLET) that cuts it into
// 20 ms chunks of 16-bit PCM at the context's rate, each sent as a binary message. Barge-in: when the
// server says speech started, the player is silenced at once and the page answers with what was heard
// of the answer that was playing (the server keeps only that in the conversation, then answers).
//
// window.glm4voiceLive is what the browser tests read: state, the server's messages, and one record per
// speech start (bargeIns) with what the page measured on its own clocks (performance.now(), ms):
//   vadOnsetMs  when the microphone captured the sample where the server's VAD put the start of speech;
//   onsetMs     when it captured the first loud chunk near it (the acoustic onset; null if none);
//   silentMs    when the player's output fell silent (the stop, its fade and the output latency);
//   stopLatencyMs = silentMs - (onsetMs, else vadOnsetMs); wasPlaying: the answer was audible at the
//   onset; playedAtOnsetMs: how much of it had been heard by then; turn and playedMs: what the player
//   stopped, and how much of it had been heard when it stopped.
(function () {
  "use strict";
  if (window.glm4voiceLive) return;

  const CHUNK_MS = 20;
  const KEEP_CHUNKS = 6000; // two minutes of chunk times, for the measurements
  const KEEP_EVENTS = 1000;
  const SPEECH_PEAK = 0.01; // -40 dBFS: a louder chunk is speech, for the acoustic onset
  const ONSET_LOOKBACK_MS = 500;
  const ONSET_LOOKAHEAD_MS = 100;
  const STATES = {
    off: "",
    connecting: "🎙️ Connecting…",
    listening: "🎙️ Listening: just speak",
    hearing: "🗣️ Hearing you…",
    thinking: "⏳ Answering…",
    error: "⚠️ Conversation mode stopped: ",
  };

  function socketUrl(path) {
    const url = new URL(path, document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  function keepLast(list, n) {
    if (list.length > n) list.splice(0, list.length - n);
  }

  class LiveConversation {
    constructor() {
      this.path = null;
      this.ws = null;
      this.mic = null;
      this.sampleRate = null;
      this.chunks = [];
      this.state = "off";
      this.error = null;
      this.events = [];
      this.bargeIns = [];
    }

    // Follow the page's live-socket element: a socket path starts conversation mode, none stops it.
    sync(element) {
      const path = (element && element.dataset.socket) || null;
      if (path !== this.path) {
        if (this.path) this.stop(true);
        if (path) this.start(path);
      }
      this.render();
    }

    start(path) {
      this.path = path;
      this.state = "connecting";
      this.error = null;
      const ws = new WebSocket(socketUrl(path));
      ws.binaryType = "arraybuffer";
      ws.onmessage = (event) => this.onMessage(ws, event);
      ws.onclose = () => {
        if (this.ws === ws) this.fail("the connection to the server closed");
      };
      this.ws = ws;
      this.render();
    }

    stop(sayBye) {
      const ws = this.ws;
      this.ws = null;
      this.path = null;
      if (ws) {
        if (sayBye && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "bye" }));
        ws.close();
      }
      this.closeMicrophone();
      if (this.state !== "error") this.state = "off";
      this.render();
    }

    fail(message) {
      console.warn("glm4voice conversation mode:", message);
      this.stop(false);
      this.state = "error";
      this.error = message;
      this.render();
    }

    async openMicrophone(ws) {
      const parts = [];
      try {
        const media = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
        });
        parts.push(() => media.getTracks().forEach((track) => track.stop()));
        const ctx = new AudioContext({ latencyHint: "interactive" });
        parts.push(() => ctx.close());
        await ctx.audioWorklet.addModule(new URL(window.GLM4VOICE_MIC_WORKLET, document.baseURI).href);
        if (this.ws !== ws) throw new Error("stopped");
        const source = ctx.createMediaStreamSource(media);
        const node = new AudioWorkletNode(ctx, "glm4voice-mic", {
          numberOfInputs: 1,
          numberOfOutputs: 1,
          outputChannelCount: [1],
          processorOptions: { chunkMs: CHUNK_MS },
        });
        const mute = ctx.createGain(); // keeps the worklet pulled by the graph, silently
        mute.gain.value = 0;
        source.connect(node);
        node.connect(mute);
        mute.connect(ctx.destination);
        this.sampleRate = ctx.sampleRate;
        this.chunks = [];
        ws.send(JSON.stringify({ type: "start", sample_rate: ctx.sampleRate }));
        node.port.onmessage = (event) => this.onChunk(ws, event.data);
        if (ctx.state === "suspended") await ctx.resume();
        this.mic = { close: () => parts.forEach((close) => close()) };
        if (this.state === "connecting") this.state = "listening";
      } catch (error) {
        parts.forEach((close) => close());
        if (this.ws === ws) this.fail("the microphone is not available (" + (error && error.message) + ")");
      }
      this.render();
    }

    closeMicrophone() {
      if (this.mic) this.mic.close();
      this.mic = null;
    }

    onChunk(ws, chunk) {
      this.chunks.push({ position: chunk.position, samples: chunk.samples, peak: chunk.peak, receivedMs: performance.now() });
      keepLast(this.chunks, KEEP_CHUNKS);
      if (ws === this.ws && ws.readyState === WebSocket.OPEN) ws.send(chunk.pcm);
    }

    onMessage(ws, event) {
      if (ws !== this.ws || typeof event.data !== "string") return;
      const message = JSON.parse(event.data);
      message.receivedMs = performance.now();
      this.events.push(message);
      keepLast(this.events, KEEP_EVENTS);
      const player = window.glm4voicePlayer;
      if (message.type === "ready") this.openMicrophone(ws);
      else if (message.type === "speech_started") this.speechStarted(ws, message);
      else if (message.type === "speech_stopped") this.state = "thinking";
      else if (message.type === "answer" && player) player.play(message.stream, message.turn);
      else if (message.type === "answer_done" && this.state === "thinking") this.state = "listening";
      else if (message.type === "error") console.warn("glm4voice conversation mode:", message.message);
      this.render();
    }

    // The user speaks: silence the answer now, tell the server what was heard of it, note the timing.
    speechStarted(ws, message) {
      const player = window.glm4voicePlayer;
      const heardMs = performance.now();
      const report = player && player.active ? player.interrupt() : { turn: null, playedMs: 0, wasPlaying: false, silentMs: heardMs };
      ws.send(JSON.stringify({ type: "playback", turn: report.turn, played_ms: report.playedMs }));
      this.state = "hearing";
      const vadOnsetMs = this.captureTime(message.speech_start_ms);
      const onsetMs = this.acousticOnset(message.speech_start_ms);
      const from = onsetMs !== null ? onsetMs : vadOnsetMs;
      const onsetTime = report.turn !== null && from !== null ? player.contextTimeAt(from) : null;
      this.bargeIns.push({
        itemId: message.item_id,
        speechStartMs: message.speech_start_ms,
        turn: report.turn,
        playedMs: report.playedMs,
        wasPlaying: report.turn !== null && from !== null && player.playingAt(from),
        playedAtOnsetMs: onsetTime !== null ? Math.floor(1000 * player.heardSeconds(onsetTime)) : 0,
        vadOnsetMs: vadOnsetMs,
        onsetMs: onsetMs,
        heardMs: heardMs,
        silentMs: report.silentMs,
        stopLatencyMs: from !== null ? report.silentMs - from : null,
      });
    }

    // When the microphone captured the stream's sample at `ms` (from the chunks' arrival times).
    captureTime(ms) {
      const rate = this.sampleRate;
      const position = (ms / 1000) * rate;
      for (let i = this.chunks.length - 1; i >= 0; i--) {
        const chunk = this.chunks[i];
        if (chunk.position <= position) return chunk.receivedMs - (1000 * (chunk.position + chunk.samples - position)) / rate;
      }
      return null;
    }

    // When the first loud chunk near the VAD's start of speech began (null: none).
    acousticOnset(ms) {
      const rate = this.sampleRate;
      const from = ((ms - ONSET_LOOKBACK_MS) / 1000) * rate;
      const to = ((ms + ONSET_LOOKAHEAD_MS) / 1000) * rate;
      for (const chunk of this.chunks) {
        if (chunk.position + chunk.samples <= from || chunk.position > to) continue;
        if (chunk.peak >= SPEECH_PEAK) return chunk.receivedMs - (1000 * chunk.samples) / rate;
      }
      return null;
    }

    render() {
      const text = STATES[this.state] + (this.state === "error" ? this.error : "");
      for (const el of document.querySelectorAll(".glm4voice-mic-status")) {
        el.textContent = text;
        el.dataset.state = this.state;
      }
    }
  }

  window.glm4voiceLive = new LiveConversation();
})();
