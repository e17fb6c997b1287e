// Gapless streaming player of the GLM-4-Voice web demo.
//
// The server streams one turn's speech as frames: a little-endian uint32 sample count, then that
// many little-endian int16 mono samples at the decoder's rate. Each frame becomes one
// AudioBuffer, started exactly where the previous one ends (sample-accurate scheduling on an
// AudioContext that runs at the decoder's rate, so no resampling happens at chunk seams): no gaps,
// no overlaps, no clicks. Playback starts with the first frame, a small lead ahead of "now"
// (window.GLM4VOICE_PLAYER_LEAD_S). If a frame arrives after
// its slot has passed (the producer is slower than real time) it is scheduled a lead ahead again,
// the lead doubles (up to MAX_LEAD_S: a jitter buffer that adapts), and the underrun is counted.
//
// window.glm4voicePlayer.stats is the instrumentation the browser tests read: frames received,
// samples and seconds scheduled, each frame's start time and duration, underruns and the silence
// they inserted, seams that are not sample-exact.
//
// Stopping: interrupt() silences the answer at once (a 15 ms fade) and says how much of it was heard,
// from the player's own clock: the scheduled audio whose time has passed on the AudioContext, less the
// output latency (underrun gaps are not counted). The page sends that figure to the server, which
// keeps only the heard part of the answer in the conversation. A stopped turn never plays again,
// whatever re-renders the page. While a turn streams or plays, the page's body carries the class
// "glm4voice-answering" (the Stop button shows then).
(function () {
  "use strict";
  if (window.glm4voicePlayer) return;

  const HEADER_BYTES = 4;
  const MAX_LEAD_S = 2.0;
  const FADE_OUT_S = 0.015;
  const INT16_SCALE = 1 / 32768;

  function freshStats(turn, sampleRate) {
    return {
      turn: turn,
      sampleRate: sampleRate,
      contextRate: null,
      state: "connecting",
      frames: 0,
      samples: 0,
      seconds: 0,
      starts: [],
      durations: [],
      underruns: 0,
      underrunSeconds: 0,
      lead: null,
      seamGaps: 0,
      maxSeamError: 0,
      firstFrameMs: null,
      firstStartTime: null,
      requestedMs: performance.now(),
      finishedMs: null,
      error: null,
      stop: null,
    };
  }

  // Settings the page's head sets from Python (glm4voice/web/page.py): the decoder's sample rate
  // (GLM4VOICE_SAMPLE_RATE) and the start lead (GLM4VOICE_PLAYER_LEAD_S, which the server's block
  // pacing also counts on). Nothing here has a value of its own.
  function pageSetting(name) {
    const value = Number(window[name]);
    if (!(value > 0)) throw new Error("glm4voice player: the page did not set window." + name);
    return value;
  }

  class StreamPlayer {
    constructor() {
      this.sampleRate = pageSetting("GLM4VOICE_SAMPLE_RATE");
      this.ctx = null;
      this.output = null;
      this.turn = null;
      this.abort = null;
      this.sources = [];
      this.t0 = null;
      this.scheduled = 0;
      this.stats = freshStats(null, this.sampleRate);
      this.history = [];
      this.ended = new Set();
    }

    // Create (or resume) the AudioContext; called on the first user gesture and on each stream.
    unlock() {
      if (!this.ctx) {
        try {
          this.ctx = new AudioContext({ sampleRate: this.sampleRate, latencyHint: "interactive" });
        } catch (error) {
          // A browser that cannot run a context at this rate resamples each buffer instead.
          this.ctx = new AudioContext({ latencyHint: "interactive" });
        }
      }
      if (this.ctx.state === "suspended") this.ctx.resume();
      return this.ctx;
    }

    // Start streaming a turn (idempotent for the turn that is already playing).
    attach(element) {
      const url = element && element.dataset.stream;
      const turn = element && element.dataset.turn;
      if (!url || !turn || turn === this.turn) {
        this.render();
        return;
      }
      this.play(url, turn);
    }

    async play(url, turn) {
      if (turn === this.turn || this.ended.has(turn)) return;  // playing, or stopped: never again
      this.stop();
      const ctx = this.unlock();
      this.turn = turn;
      this.t0 = null;
      this.scheduled = 0;
      this.lead = pageSetting("GLM4VOICE_PLAYER_LEAD_S");
      this.stats = freshStats(turn, this.sampleRate);
      this.stats.lead = this.lead;
      this.stats.contextRate = ctx.sampleRate;
      this.output = ctx.createGain();
      this.output.connect(ctx.destination);
      const abort = new AbortController();
      this.abort = abort;
      const stats = this.stats;
      this.render();
      try {
        const response = await fetch(url, { signal: abort.signal, cache: "no-store" });
        if (!response.ok) throw new Error("audio stream answered HTTP " + response.status);
        stats.state = "streaming";
        const reader = response.body.getReader();
        let pending = new Uint8Array(0);
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          pending = concat(pending, value);
          pending = this.consumeFrames(pending, stats);
        }
        if (pending.length) throw new Error("audio stream ended inside a frame");
        stats.state = "finished";
      } catch (error) {
        if (abort.signal.aborted) {
          stats.state = "stopped";
        } else {
          stats.state = "error";
          stats.error = String(error && error.message ? error.message : error);
          console.error("glm4voice player:", error);
        }
      } finally {
        stats.finishedMs = performance.now();
        if (this.abort === abort) this.abort = null;
        this.render();
      }
    }

    consumeFrames(bytes, stats) {
      let offset = 0;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      while (bytes.length - offset >= HEADER_BYTES) {
        const count = view.getUint32(offset, true);
        const size = HEADER_BYTES + 2 * count;
        if (bytes.length - offset < size) break;
        const samples = new Float32Array(count);
        for (let i = 0; i < count; i++) samples[i] = view.getInt16(offset + HEADER_BYTES + 2 * i, true) * INT16_SCALE;
        this.schedule(samples, stats);
        offset += size;
      }
      return bytes.slice(offset);
    }

    schedule(samples, stats) {
      if (!samples.length) return;
      const ctx = this.ctx;
      const buffer = ctx.createBuffer(1, samples.length, this.sampleRate);
      buffer.copyToChannel(samples, 0);
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.output);
      if (this.t0 === null) {
        this.t0 = ctx.currentTime + this.lead;
        stats.firstFrameMs = performance.now();
        stats.firstStartTime = this.t0;
      }
      let when = this.t0 + this.scheduled / this.sampleRate;
      if (when < ctx.currentTime) {
        // Too late for a seamless seam: restart the clock a (longer) lead ahead and count it.
        this.lead = Math.min(2 * this.lead, MAX_LEAD_S);
        const restart = ctx.currentTime + this.lead;
        stats.underruns += 1;
        stats.underrunSeconds += restart - when;
        stats.lead = this.lead;
        this.t0 = restart - this.scheduled / this.sampleRate;
        when = restart;
      }
      const n = stats.starts.length;
      if (n) {
        const seamError = Math.abs(when - (stats.starts[n - 1] + stats.durations[n - 1]));
        stats.maxSeamError = Math.max(stats.maxSeamError, seamError);
        if (seamError > 0.5 / this.sampleRate) stats.seamGaps += 1;  // only an underrun makes one
      }
      source.start(when);
      source.onended = () => {
        const i = this.sources.indexOf(source);
        if (i >= 0) this.sources.splice(i, 1);
        this.render();
      };
      this.sources.push(source);
      this.scheduled += samples.length;
      stats.frames += 1;
      stats.samples += samples.length;
      stats.seconds = stats.samples / this.sampleRate;
      stats.starts.push(when);
      stats.durations.push(buffer.duration);
      this.render();
    }

    // A turn streams or has audio still to play.
    get active() {
      return this.abort !== null || this.sources.length > 0;
    }

    // The AudioContext time the listener hears now (what was rendered, less the output latency).
    audibleTime() {
      if (!this.ctx) return 0;
      return Math.max(0, this.ctx.currentTime - (this.ctx.outputLatency || 0));
    }

    // Seconds of the current turn's speech heard by context time t (gaps between chunks not counted).
    heardSeconds(t) {
      const s = this.stats;
      let heard = 0;
      for (let i = 0; i < s.starts.length; i++) heard += Math.min(s.durations[i], Math.max(0, t - s.starts[i]));
      return heard;
    }

    // Context time of a performance.now() instant (both clocks as the output reports them).
    contextTimeAt(perfMs) {
      if (!this.ctx) return null;
      const stamp = this.ctx.getOutputTimestamp ? this.ctx.getOutputTimestamp() : null;
      if (!stamp || !stamp.performanceTime) return this.ctx.currentTime - (performance.now() - perfMs) / 1000;
      return stamp.contextTime + (perfMs - stamp.performanceTime) / 1000;
    }

    // Was speech of the current turn audible at performance.now() instant perfMs?
    playingAt(perfMs) {
      const t = this.contextTimeAt(perfMs);
      const s = this.stats;
      if (t === null) return false;
      for (let i = 0; i < s.starts.length; i++) if (t >= s.starts[i] && t < s.starts[i] + s.durations[i]) return true;
      return false;
    }

    // Stop the current turn for the listener (Stop, or the user speaking over it): silence it now and
    // say what was heard. Returns {turn, playedMs, wasPlaying, silentMs} (turn null: nothing to stop).
    interrupt() {
      const turn = this.turn;
      const now = performance.now();
      const report = { turn: turn, playedMs: 0, wasPlaying: false, silentMs: now };
      if (turn !== null) {
        const heard = this.heardSeconds(this.audibleTime());
        report.playedMs = Math.floor(1000 * heard);
        report.wasPlaying = this.playingAt(now);
        const latency = this.ctx ? this.ctx.outputLatency || this.ctx.baseLatency || 0 : 0;
        report.silentMs = now + 1000 * (FADE_OUT_S + latency);  // the fade done, through the output
        this.stats.stop = report;
        this.stats.state = "stopped";
      }
      this.stop();
      this.render();
      return report;
    }

    // Stop the current turn: abort its stream, fade out what is still scheduled.
    stop() {
      if (this.abort) this.abort.abort();
      this.abort = null;
      if (this.turn !== null) this.ended.add(this.turn);
      if (this.stats.turn) this.history.push(this.stats);
      if (this.ctx && this.output && this.sources.length) {
        const now = this.ctx.currentTime;
        this.output.gain.setValueAtTime(this.output.gain.value, now);
        this.output.gain.linearRampToValueAtTime(0, now + FADE_OUT_S);
        for (const source of this.sources) source.stop(now + FADE_OUT_S);
      }
      this.sources = [];
      this.turn = null;
    }

    // Reflect the state in every status element of the page (there is one per live player).
    render() {
      const s = this.stats;
      let text = "";
      if (s.state === "connecting") text = "Waiting for speech…";
      else if (s.state === "streaming") text = s.frames ? "Speaking… " + s.seconds.toFixed(1) + " s streamed" : "Waiting for speech…";
      else if (s.state === "finished") text = s.frames ? "Streamed " + s.seconds.toFixed(1) + " s of speech in " + s.frames + " chunks" + (s.underruns ? " (" + s.underruns + " underruns)" : ", gapless") : "No speech in this answer";
      else if (s.state === "stopped") text = "Stopped";
      else if (s.state === "error") text = "Audio stream failed: " + s.error;
      for (const el of document.querySelectorAll(".glm4voice-live-status")) {
        el.textContent = text;
        el.dataset.state = s.state;
      }
      if (document.body) document.body.classList.toggle("glm4voice-answering", this.active);
    }
  }

  function concat(a, b) {
    if (!a.length) return b;
    const out = new Uint8Array(a.length + b.length);
    out.set(a, 0);
    out.set(b, a.length);
    return out;
  }

  const player = new StreamPlayer();
  window.glm4voicePlayer = player;
  for (const type of ["pointerdown", "keydown", "touchstart"]) {
    document.addEventListener(type, () => player.unlock(), { capture: true, passive: true });
  }
})();
