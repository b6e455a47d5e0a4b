// The part of seek-bzip 2.0.0 (lib/index.js) that decompress.ts uses: decode()
// takes byte streams (any object with readByte / writeByte) and returns nothing
// for a stream output.
declare module 'seek-bzip' {
  interface InStream {
    readByte(): number;
    read(buf: Uint8Array, at: number, length: number): number;
    seek(pos: number): void;
    eof(): boolean;
  }
  interface OutStream {
    writeByte(b: number): void;
  }
  const Bunzip: {
    decode(input: InStream | Uint8Array, output?: OutStream | Uint8Array | number, multistream?: boolean): Buffer | undefined;
  };
  export default Bunzip;
}
