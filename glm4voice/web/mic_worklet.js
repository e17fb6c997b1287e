// AudioWorklet processor of the page's conversation mode (glm4voice/web/live.js): the microphone as
// 16-bit PCM. Each chunk (processorOptions.chunkMs of audio at the context's rate, mono: the first
// channel of the track, which is asked for one) goes to the main thread as an ArrayBuffer of int16
// samples, with its position in the stream (samples before it) and its peak level.
class Glm4VoiceMic extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = options.processorOptions.chunkMs;
    this.size = Math.max(128, Math.round((sampleRate * chunkMs) / 1000));
    this.position = 0;
    this.start();
  }

  start() {
    this.buffer = new Int16Array(this.size);
    this.fill = 0;
    this.peak = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) {
      const samples = channels[0];
      for (let i = 0; i < samples.length; i++) {
        const x = Math.max(-1, Math.min(1, samples[i]));
        this.buffer[this.fill++] = Math.round(x * 32767);
        if (Math.abs(x) > this.peak) this.peak = Math.abs(x);
        if (this.fill === this.size) this.flush();
      }
    }
    return true;
  }

  flush() {
    const pcm = this.buffer.buffer;
    this.port.postMessage({ position: this.position, samples: this.fill, peak: this.peak, pcm: pcm }, [pcm]);
    this.position += this.fill;
    this.start();
  }
}

registerProcessor("glm4voice-mic", Glm4VoiceMic);
